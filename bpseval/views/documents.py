"""Documents for CI: the markdown summary and the JUnit XML of `bpseval compare`.

User text (dataset names, cell ids, paths) is escaped for each format: markdown and HTML syntax
in the summary (where no URL or e-mail address in a name becomes a link), and characters that XML 1.0
forbids in the JUnit file, which therefore always parses. Verdicts made on different samples (or on
samples that may differ) are marked in both.
"""

from __future__ import annotations

from xml.etree import ElementTree

from bpseval.features.compare import INCONCLUSIVE, OVERALL, SAME, UNDEFINED, Comparison, MetricComparison
from bpseval.views.text import (
    ATTRIBUTION_HEADER,
    ATTRIBUTION_TOP,
    COVERAGE_LISTED,
    GROUP_HEADER,
    SAMPLES_MARKS,
    attribution_rows,
    attribution_title,
    cell_text,
    contribution_text,
    delta_text,
    format_bps,
    group_rows,
    interval_text,
    listed_attributions,
    markdown_text,
    more_attributions_text,
    printable,
    samples_status,
    share_text,
    verdict_text,
)


def compare_markdown(comparison: Comparison, top: int = ATTRIBUTION_TOP) -> str:
    """A compact markdown summary for $GITHUB_STEP_SUMMARY (a row per metric; the `top` cells and groups of each
    failed metric's change; coverage capped)."""
    status = "✓ no regression" if comparison.passed else "✗ regression: " + "; ".join(comparison.reasons)
    status += samples_status(comparison)
    significance = comparison.settings.significance
    header = (
        ["scope", "metric", "baseline", "new", "Δ", "tolerance"]
        + ([f"{100 * (1 - significance):g}% interval"] if significance is not None else [])
        + ["verdict"]
    )
    lines = [
        "### bpseval compare",
        "",
        f"**{markdown_text(status)}** · mode: {comparison.mode} · baseline: {markdown_text(comparison.baseline)}"
        f" · run: {markdown_text(comparison.run)}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for metric in comparison.metrics:
        cells = [
            markdown_text(metric.scope),
            metric.metric,
            format_bps(metric.base),
            format_bps(metric.new),
            delta_text(metric),
            format_bps(metric.tolerance),
        ]
        if significance is not None:
            cells.append(interval_text(metric))
        lines.append("| " + " | ".join([*cells, verdict_text(metric)]) + " |")
    lines += [""] + [f"- note: {markdown_text(note)}" for note in comparison.notes]
    warnings = comparison.sample_warnings + comparison.inconclusive_warnings
    lines += [f"- warning: {markdown_text(warning)}" for warning in warnings]
    listed = (("missing from the run", comparison.missing_datasets), ("new in the run", comparison.new_datasets))
    for title, names in listed:
        if names:
            lines.append(f"- datasets {title}: {', '.join(markdown_text(name) for name in names)}")
    regressions = comparison.coverage_regressions
    if len(regressions):
        lines += ["", f"{len(regressions)} cells ok in the baseline are now uncovered:"]
        lines += [
            f"- {markdown_text(row.dataset)} cell {row.cell} (id {markdown_text(row.cell_id)})"
            for row in regressions.head(COVERAGE_LISTED).itertuples(index=False)
        ]
        if len(regressions) > COVERAGE_LISTED:
            lines.append(f"- … and {len(regressions) - COVERAGE_LISTED} more")
    attributed, more = listed_attributions(comparison)
    for metric in attributed:
        attribution = metric.attribution
        assert attribution is not None
        rows = attribution_rows(attribution, top)
        lines += ["", f"**{markdown_text(attribution_title(metric, len(rows)))}**", ""]
        lines += _markdown_table(ATTRIBUTION_HEADER, rows)
        if attribution.groups:
            lines += ["", f"Δ per group of {markdown_text(metric.label)}:", ""]
            lines += _markdown_table(GROUP_HEADER, group_rows(attribution, top))
    if more:
        lines += ["", f"- note: {more_attributions_text(more)}"]
    return "\n".join(lines).rstrip("\n") + "\n"


def _markdown_table(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    """A markdown table of rows whose first two values are user text."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join([markdown_text(a), markdown_text(b), *rest]) + " |" for a, b, *rest in rows]


def _interval_clause(metric: MetricComparison) -> str:
    """The interval of a change in a JUnit message, or why there is none."""
    return f"no interval: {metric.no_interval}" if metric.no_interval else f"interval {interval_text(metric)}"


def _largest_part(metric: MetricComparison) -> str:
    """The cell that contributes most to a failed metric's change, as the end of its JUnit message."""
    if metric.attribution is None or not metric.attribution.cells:
        return ""
    cell = metric.attribution.cells[0]
    share = share_text(metric.attribution.share(cell))
    return f"; most of it: {cell.dataset} cell {cell_text(cell)} ({contribution_text(cell.delta)}, {share} of Δ)"


def compare_junit(comparison: Comparison) -> str:
    """JUnit XML: one testcase per gated metric, per dataset's coverage and per missing dataset.

    A gated metric that fails (regressed, became undefined, or inconclusive with --fail-on-inconclusive) is a
    failure; one inconclusive that passes is skipped with the warning as its message, and so is one undefined
    in the baseline.
    """
    cases: list[tuple[str, str, str, str | None, str | None]] = []
    # classname, name, outcome ("failure", "skipped", ""), message, the testcase's output (the samples' mark)
    failed = {id(metric) for metric in comparison.failed_metrics}
    for metric in comparison.metrics:
        if not metric.gated:
            continue
        outcome, message = "", None
        if id(metric) in failed:
            outcome, message = (
                "failure",
                (
                    f"{metric.reason}: {format_bps(metric.base)} → {format_bps(metric.new)} ({delta_text(metric)},"
                    f" tolerance {format_bps(metric.tolerance)}, {_interval_clause(metric)})" + _largest_part(metric)
                ),
            )
        elif metric.verdict == INCONCLUSIVE:
            outcome, message = (
                "skipped",
                f"{metric.label} is inconclusive: {format_bps(metric.base)} → {format_bps(metric.new)}"
                f" ({delta_text(metric)}, tolerance {format_bps(metric.tolerance)}, {_interval_clause(metric)});"
                " it passes (--fail-on-inconclusive fails it)",
            )
        elif metric.verdict == UNDEFINED:
            outcome, message = "skipped", f"{metric.label} is undefined in the baseline: nothing to compare"
        overall = metric.scope == OVERALL
        name = metric.metric if overall else f"{metric.scope}.{metric.metric}"
        output = None
        if metric.samples != SAME:
            output = f"{metric.label}: verdict{SAMPLES_MARKS[metric.samples]}"
            message = None if message is None else message + f"; verdict{SAMPLES_MARKS[metric.samples]}"
        cases.append(("bpseval.overall" if overall else "bpseval.dataset", name, outcome, message, output))
    regressions = comparison.coverage_regressions
    for dataset in regressions["dataset"].unique():
        lost = regressions[regressions["dataset"] == dataset]
        message = f"{len(lost)} cells ok in the baseline are now uncovered: cells {', '.join(map(str, lost['cell']))}"
        cases.append(("bpseval.coverage", str(dataset), "failure", message, None))
    missing = ("", None) if comparison.settings.allow_missing_datasets else ("failure", "dataset missing from the run")
    cases += [("bpseval.missing", dataset, *missing, None) for dataset in comparison.missing_datasets]
    failures = sum(case[2] == "failure" for case in cases)
    skipped = sum(case[2] == "skipped" for case in cases)
    suite = ElementTree.Element(
        "testsuite", name="bpseval compare", tests=str(len(cases)), failures=str(failures), skipped=str(skipped)
    )
    if comparison.sample_warnings:
        properties = ElementTree.SubElement(suite, "properties")
        for warning in comparison.sample_warnings:
            ElementTree.SubElement(properties, "property", name="samples", value=printable(warning))
    for classname, name, outcome, message, output in cases:
        case = ElementTree.SubElement(suite, "testcase", classname=classname, name=printable(name))
        if outcome:
            ElementTree.SubElement(case, outcome, message=printable(message)).text = printable(message)
        if output is not None:
            ElementTree.SubElement(case, "system-out").text = printable(output)
    return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"

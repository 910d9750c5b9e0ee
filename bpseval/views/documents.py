"""Documents for CI: the markdown summary and the JUnit XML of `bpseval compare`."""

from __future__ import annotations

from xml.etree import ElementTree

from bpseval.features.compare import Comparison
from bpseval.views.text import (
    COVERAGE_LISTED,
    delta_text,
    format_bps,
    interval_text,
    verdict_text,
)


def compare_markdown(comparison: Comparison) -> str:
    """A compact markdown summary for $GITHUB_STEP_SUMMARY (a row per metric; coverage capped)."""
    status = "✓ no regression" if comparison.passed else "✗ regression: " + "; ".join(comparison.reasons)
    significance = comparison.settings.significance
    header = ["scope", "metric", "baseline", "new", "Δ", "tolerance"] + (
        [f"{100 * (1 - significance):g}% interval"] if significance is not None else []
    ) + ["verdict"]
    lines = [
        "### bpseval compare",
        "",
        f"**{status}** · mode: {comparison.mode} · baseline: `{comparison.baseline}` · run: `{comparison.run}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for metric in comparison.metrics:
        cells = [metric.scope.replace("|", "\\|"), metric.metric, format_bps(metric.base), format_bps(metric.new), delta_text(metric), format_bps(metric.tolerance)]
        if significance is not None:
            cells.append(interval_text(metric))
        lines.append("| " + " | ".join(cells + [verdict_text(metric)]) + " |")
    regressions = comparison.coverage_regressions
    if len(regressions):
        lines += ["", f"{len(regressions)} cells ok in the baseline are now uncovered:"]
        lines += [f"- {row.dataset} cell {row.cell} (id {row.cell_id})" for row in regressions.head(COVERAGE_LISTED).itertuples(index=False)]
        if len(regressions) > COVERAGE_LISTED:
            lines.append(f"- … and {len(regressions) - COVERAGE_LISTED} more")
    return "\n".join(lines) + "\n"


def compare_junit(comparison: Comparison) -> str:
    """JUnit XML: one testcase per gated metric, per dataset's coverage and per missing dataset."""
    cases: list[tuple[str, str, str | None]] = []
    for metric in comparison.metrics:
        if metric.gated:
            failure = None
            if metric.verdict == "regressed":
                failure = (
                    f"{metric.label}: {format_bps(metric.base)} → {format_bps(metric.new)} ({delta_text(metric)},"
                    f" tolerance {format_bps(metric.tolerance)}, interval {interval_text(metric)})"
                )
            classname = "bpseval.overall" if metric.scope == "overall" else "bpseval.dataset"
            cases.append((classname, metric.metric if metric.scope == "overall" else f"{metric.scope}.{metric.metric}", failure))
    regressions = comparison.coverage_regressions
    for dataset in comparison.coverage_regressions["dataset"].unique():
        lost = regressions[regressions["dataset"] == dataset]
        cases.append(("bpseval.coverage", str(dataset), f"{len(lost)} cells ok in the baseline are now uncovered: cells {', '.join(map(str, lost['cell']))}"))
    for dataset in comparison.missing_datasets:
        failure = None if comparison.settings.allow_missing_datasets else "dataset missing from the run"
        cases.append(("bpseval.missing", dataset, failure))
    suite = ElementTree.Element(
        "testsuite", name="bpseval compare", tests=str(len(cases)), failures=str(sum(f is not None for *_, f in cases))
    )
    for classname, name, failure in cases:
        case = ElementTree.SubElement(suite, "testcase", classname=classname, name=name)
        if failure is not None:
            ElementTree.SubElement(case, "failure", message=failure).text = failure
    return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"

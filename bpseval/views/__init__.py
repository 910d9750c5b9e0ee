"""How results reach people and programs: frames and JSON, tables, CSV, markdown, JUnit, figures, HTML."""

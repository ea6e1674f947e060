"""What a study writes: Markdown tables, and its NAME.md and NAME.json in the run folder, its figure
linked by a path relative to that folder (so the report still shows it when the run folder is moved
or copied with its plots)."""
import os
from pathlib import Path

from toy_rlhf.files import write_json, write_text


def markdown_table(header, rows, text_columns=(0,)):
    """A Markdown table of header (the column titles) and rows (lists of cells, formatted already):
    the columns in text_columns are left-aligned, the others (numbers) right-aligned."""
    rule = '|' + ''.join('---|' if column in text_columns else '---:|' for column in range(len(header)))
    return '\n'.join([_table_row(header), rule, *(_table_row(cells) for cells in rows)])


def _table_row(cells):
    return '| ' + ' | '.join(cells) + ' |'


def figure_link(figure, run_dir):
    """The Markdown image of figure (named by its file's stem), by its path relative to run_dir."""
    figure = Path(figure)
    return f'![{figure.stem}]({Path(os.path.relpath(figure, run_dir)).as_posix()})'


def write_study(run_dir, name, text, record, figure=None, record_name=None):
    """Write a study's outputs into run_dir: NAME.md (text, then the figure linked where one is given)
    and RECORD_NAME.json (record; NAME.json by default). Returns the .md file's path."""
    run_dir = Path(run_dir)
    write_json(run_dir / f'{record_name or name}.json', record)
    report = run_dir / f'{name}.md'
    write_text(report, text if figure is None else f'{text}\n{figure_link(figure, run_dir)}\n')
    return report

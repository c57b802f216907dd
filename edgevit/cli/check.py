"""``edgevit check``: every cell of a project file exported, verified and judged (docs/ci.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from edgevit.cli import err_console, fail, out_console
from edgevit.errors import EdgevitError


def check_cmd(
    project: Optional[Path] = typer.Option(
        None, "--project", "-p", help="Project file [default: ./edgevit.toml, else ./pyproject.toml's [tool.edgevit]]."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Cells exported at once [default: the project's "
                                       "'jobs', else 1]."),
    update_baseline: bool = typer.Option(False, "--update-baseline", help="Write the baseline (edgevit.lock.json) "
                                         "from this run instead of comparing with it."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Baseline file [default: edgevit.lock.json "
                                            "beside the project file]; compared with when it exists."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="JUnit XML path [default: OUT/junit.xml]."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Markdown summary path [default: OUT/summary.md; "
                                           "also appended to $GITHUB_STEP_SUMMARY when set]."),
    out: Path = typer.Option(Path("edgevit-check"), "--out", "-o", help="Artifacts and reports."),
    cells: Optional[str] = typer.Option(None, "--cells", help="Only the cells whose id contains this text."),
    print_extras: bool = typer.Option(False, "--print-extras", help="Print the pip extras the project needs "
                                      "(comma-separated) and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print results.json instead of the table."),
) -> None:
    """Export every cell of the project file, check parity and budgets, compare with the baseline.

    Exit 0 when every cell passes and nothing regressed, 1 otherwise, 2 on a bad project file or flag.
    """
    from edgevit import check as chk
    from edgevit.check import report

    try:
        loaded = chk.load_project(chk.find_project(project))
        selected = chk.select(loaded, cells)
        if print_extras:
            out_console.print(",".join(chk.extras(selected)), highlight=False)
            raise typer.Exit(0)
        if jobs is not None and jobs < 1:
            raise EdgevitError(f"--jobs must be >= 1, got {jobs}")
        lock = baseline or loaded.lock_path
        compared = lock.exists() and not update_baseline
        results = chk.check(selected, out, jobs or loaded.jobs, lock, update_baseline,
                            on_result=None if as_json else _progress(len(selected)))
    except EdgevitError as exc:
        fail(str(exc), exc.exit_code)
    versions = chk.tool_versions(r.record for r in results)
    paths = report.write_all(results, out, loaded.path, None if update_baseline else lock, versions, junit, summary)
    if as_json:
        out_console.file.write(paths["json"].read_text())
    else:
        out_console.print(report.table(results))
        out_console.print(report.summary_line(results), highlight=False)
        if update_baseline:
            out_console.print(f"baseline written: {lock}", highlight=False)
        else:
            out_console.print(f"compared with the baseline {lock}" if compared else f"no baseline at {lock} (write "
                              "one with --update-baseline)", highlight=False)
        out_console.print("written: " + ", ".join(str(p) for p in paths.values()), highlight=False)
    raise typer.Exit(0 if all(r.ok for r in results) else 1)


def _progress(total: int):  # noqa: ANN202 - a closure
    """One line per finished cell on stderr, as cells end (with --jobs, not in the project's order)."""
    done = [0]

    def line(result) -> None:  # noqa: ANN001
        from edgevit.check.report import mark

        done[0] += 1
        reason = f": {result.reason}" if not result.ok else ""
        err_console.print(f"[{done[0]}/{total}] {mark(result)} {escape(result.cell.id)} {result.status} "
                          f"({result.seconds:.0f} s){escape(reason)}", highlight=False, soft_wrap=True)
    return line


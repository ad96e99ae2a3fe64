"""python -m benchmarks.report: rebuild a run's report, file a GPU run's folder, print README's section.

python -m benchmarks.report DIR             rebuild DIR's report.md, results.json and plots
python -m benchmarks.report --adopt DIR     copy a GPU run's folder to benchmarks/reports/<gpu-slug>/
                                            and regenerate the reports index
python -m benchmarks.report --index         regenerate benchmarks/reports/README.md
python -m benchmarks.report --readme        print README.md's benchmark numbers (newest GPU report)
"""

import argparse
import sys
from pathlib import Path

from benchmarks import report


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dir", nargs="?", type=Path, help="a run's report folder (with results.json) to rebuild")
    parser.add_argument(
        "--adopt", type=Path, metavar="DIR", help="file a GPU run's report folder under benchmarks/reports/<gpu-slug>/"
    )
    parser.add_argument("--index", action="store_true", help="rewrite benchmarks/reports/README.md")
    parser.add_argument("--readme", action="store_true", help="print README.md's benchmark numbers")
    args = parser.parse_args(argv)
    if not (args.dir or args.adopt or args.index or args.readme):
        parser.error("give a run folder, --adopt DIR, --index or --readme")
    if args.dir:
        if report.read_json(args.dir / report.RESULTS) is None:
            parser.error(f"{args.dir}: no readable {report.RESULTS} (a report folder of python -m benchmarks)")
        report.build(args.dir)
        print(args.dir / "report.md")
    if args.adopt:
        try:
            print(f"filed as {report.adopt(args.adopt)}; commit it with benchmarks/reports/README.md")
        except ValueError as exc:
            parser.error(str(exc))
    if args.index:
        (report.REPORTS_DIR / "README.md").write_text(report.render_index())
    if args.readme:
        print(report.readme_section(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m transfuse.report --config FILE [--set key=value ...]``: (re)write a run's report without Ray."""

from transfuse.report import main

if __name__ == "__main__":
    raise SystemExit(main())

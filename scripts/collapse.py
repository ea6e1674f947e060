"""The collapse and the ceiling of one run, measured exactly: `python scripts/collapse.py --run-dir PATH`."""
from toy_rlhf.studies.collapse import main

if __name__ == '__main__':
    main()

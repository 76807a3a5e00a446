"""python -m iarmem_core.conformance GOLDEN_DIR: print one JSON report; exit 0 only if all tensors match."""

import json
import sys

from iarmem_core.conformance import run


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m iarmem_core.conformance GOLDEN_DIR", file=sys.stderr)
        return 2
    try:
        report = run(args[0])
    except (FileNotFoundError, ValueError) as e:
        print(json.dumps({"all_ok": False, "error": str(e)}))
        return 1
    print(json.dumps(report, indent=1))
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

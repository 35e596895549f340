"""``python -m entmath.ledger [--write]``: check (or write) the packaged table of the book's displays."""

def _main(argv=None) -> int:
    import argparse
    import json
    from pathlib import Path

    from .index import display_table

    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--book", type=Path, default=here.parents[1] / "book", help="the chapters' folder")
    ap.add_argument("--write", action="store_true", help="write the table (default: check it)")
    args = ap.parse_args(argv)
    text = json.dumps(display_table(args.book), ensure_ascii=False, indent=1) + "\n"
    target = here / "book_displays.json"
    if args.write:
        target.write_text(text, encoding="utf-8")
        return 0
    current = target.read_text(encoding="utf-8") if target.exists() else ""
    if current != text:
        print(f"{target} differs from the displays of {args.book}: run python -m entmath.ledger --write")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

"""Write every preset of ``ditopt.presets.PRESETS`` as ``configs/presets/<name>.yaml``.

Each file is the preset at its default settings for 20 steps (the zoo models' step count);
``Plan.load(path).resample(n)`` adapts it to another count. tests/test_presets.py checks the
files equal what the functions return, so run this after changing a preset:

    python tools/write_presets.py            # rewrite configs/presets/
    python tools/write_presets.py --check    # exit 1 if a file is missing or stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ditopt.presets import PRESETS

STEPS = 20
OUT = Path(__file__).resolve().parent.parent / "configs" / "presets"


def preset_files(steps: int = STEPS) -> dict[str, str]:
    """``{file name: YAML text}`` of every preset at its defaults for ``steps`` steps."""
    return {f"{name}.yaml": make(steps=steps).to_yaml() for name, make in PRESETS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the files are up to date")
    args = parser.parse_args(argv)
    stale = []
    for name, text in preset_files().items():
        path = OUT / name
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'} {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

"""The README keeps up with the code: every option, and every module in the layout."""

from pathlib import Path

from fedmole.config import describe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_option_is_listed_as_fedmole_config_prints_it():
    missing = [line for line in describe() if line not in README]
    assert not missing, f"README lacks {len(missing)} option line(s) of `fedmole config`, e.g. {missing[0]}"


def test_the_layout_names_every_module():
    layout = README[README.index("## Layout"):README.index("## Embedded assets")]
    modules = {p.stem for p in (ROOT / "src" / "fedmole").rglob("*.py")} - {"__init__", "__main__"}
    missing = sorted(m for m in modules if m not in layout)
    assert not missing, f"the README's layout does not name {missing}"

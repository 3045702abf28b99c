"""Skip a test module (or test) whose optional dependency is not installed, naming the extra."""
import pytest

from rb_labelrefine._optional import EXTRAS


def need(*modules: str):
    """``pytest.importorskip`` each module, with the extra that installs it as the reason."""
    mods = []
    for m in modules:
        if m.split(".")[0] == "robustbench":
            # what the installed package's .pth does at start-up (a source checkout has no .pth)
            from rb_labelrefine.compat.robustbench import install_hook

            install_hook()
        extra = EXTRAS.get(m.split(".")[0], "all")
        mods.append(pytest.importorskip(m, reason=f"needs {m} (extra [{extra}])"))
    return mods[0] if len(mods) == 1 else mods

"""Load and run the scripts of tools/ in the test process (tools/ is not a package)."""
import functools
import importlib.util
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@functools.lru_cache(maxsize=None)
def load_tool(name: str):
    """The module of ``tools/<name>.py``."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_train_net(argv):
    """``tools/train_net.py argv`` in this process; returns what its ``main`` returns."""
    module = load_tool("train_net")
    return module.main(module.default_argument_parser().parse_args([str(a) for a in argv]))

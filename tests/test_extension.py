"""The package without its extension: import works, one warning names the fallback, ops still answer."""
import os
import subprocess
import sys
import textwrap

import pytest

BLOCK = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "hello_fast._C":
                raise ImportError("blocked by the test")
    sys.meta_path.insert(0, _Block())
""")


def _python(code):
    env = dict(os.environ, PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True, env=env)


def test_import_and_ops_work_without_the_extension():
    out = _python("""
        import torch, hello_fast
        from hello_fast.ops import soft_label_loss, soft_label_loss_reference, extension_status
        s, t = torch.randn(4, 5), torch.randn(4, 5)
        h, p, l = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 3, 2]), torch.rand(4)
        a = soft_label_loss(s, t, h, p, l, mode="kl", temperature=2.0, beta=0.5)
        b = soft_label_loss_reference(s, t, h, p, l, mode="kl", temperature=2.0, beta=0.5)
        soft_label_loss(s, t, h, p, l)
        assert torch.allclose(a, b), (a, b)
        print("status:", extension_status())
    """)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("C++/CUDA extension not available") == 1  # said once
    assert "falling back to the PyTorch reference ops" in out.stderr
    assert "status: not available" in out.stdout


def test_asking_for_cpp_without_the_extension_is_a_clear_error():
    out = _python("""
        import torch
        from hello_fast.ops import soft_label_loss
        s = torch.randn(2, 3)
        try:
            soft_label_loss(s, s, torch.tensor([0, 1]), torch.tensor([1, 0]), torch.ones(2), backend="cpp")
        except RuntimeError as e:
            print("refused:", e)
    """)
    assert "refused: soft_label_loss: backend 'cpp' is not available" in out.stdout, out.stderr


def test_extension_is_built_here():
    from hello_fast.ops import extension_status

    if os.environ.get("HELLO_FAST_SKIP_EXT") == "1":
        pytest.skip("built without the extension on purpose")
    assert extension_status().startswith("built")

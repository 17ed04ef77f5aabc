"""The native checkpoint files."""
from __future__ import annotations


def test_saved_model_files_follow_the_umask(tmp_path, tiny_model):
    """safetensors alone writes 0600; a model saved by one lab member must be readable by the server's user."""
    import os
    import stat

    from engine.models.checkpoint import load_model, save_model

    old = os.umask(0o022)
    try:
        out = save_model(tiny_model, tmp_path / "m")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(out / "model.safetensors").st_mode)
    assert mode == 0o644, oct(mode)
    assert load_model(out).fingerprint() == tiny_model.fingerprint()

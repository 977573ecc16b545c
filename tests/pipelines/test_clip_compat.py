"""clip-anytorch imports on setuptools without pkg_resources.packaging (or without pkg_resources at all)."""

import subprocess
import sys
import textwrap


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_clip_without_pkg_resources():
    # pkg_resources made unimportable, as on setuptools >= 82
    res = run("""
        import sys
        sys.modules["pkg_resources"] = None
        from pipelines import import_clip
        clip = import_clip()
        tokens = clip.tokenize(["a photo of a cat"])
        assert tokens.shape == (1, 77) and int(tokens[0, 0]) == 49406, tokens[0, :4]
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_import_clip_with_pkg_resources_lacking_packaging():
    # a pkg_resources without the vendored `packaging` attribute, as on setuptools 70..81
    res = run("""
        import sys, types
        sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")
        from pipelines import import_clip
        clip = import_clip()
        from clip.model import CLIP
        import torch
        m = CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
        img = m.encode_image(torch.zeros(1, 3, 32, 32))
        txt = m.encode_text(clip.tokenize(["a digit"]))
        assert img.shape == txt.shape == (1, 32)
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr

"""The Inception FID path loads a local weights file and produces 2048-d features (random weights stand in for the
real file, which cannot be downloaded here)."""

import pytest
import torch

torch_fidelity = pytest.importorskip("torch_fidelity")

from pipelines.evaluation import InceptionFeatures, fid_from_stats  # noqa: E402


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    path.write_bytes(b"")
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None  # build the network without weights
    orig_load = torch.load
    torch.load = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
        torch.load = orig_load
    torch.save(net.state_dict(), path)
    return path


def test_local_weights_give_2048_features(weights_file):
    feats = InceptionFeatures(weights_path=weights_file)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    # grayscale is repeated to RGB, and the input is rounded to uint8 first: all three batches give the same features
    f = feats(torch.cat([x.expand(-1, 3, -1, -1), (x * 255).round().expand(-1, 3, -1, -1) / 255]))
    assert f.shape == (4, 2048) and f.dtype == torch.float64 and torch.isfinite(f).all()
    torch.testing.assert_close(f[:2], f[2:])
    torch.testing.assert_close(feats(x), f[:2])
    assert f.std() > 0
    mu = f.mean(0).numpy()
    assert abs(fid_from_stats(mu, torch.eye(2048), mu, torch.eye(2048))) < 1e-9


def test_missing_weights_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        InceptionFeatures(weights_path=tmp_path / "nope.pth")

import sys

import numpy as np
import pytest
import torch

from cogvideo.tokenizers._torchvision_standin import STANDIN_MODULES, torchvision_importable
from cogvideo.tokenizers.icetk_vq import (
    ICETK_IMAGE_MODEL,
    PIXEL_MEAN,
    PIXEL_STD,
    CheckpointMismatchError,
    IceImageTokenizer,
    build_icetk_vqvae,
)
from cogvideo.tokenizers.image import ImageTokenizer
from cogvideo.tokenizers.loading import load_image_tokenizer

FRAME = 32  # icetk's model is convolutional; small frames keep the test fast


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """icetk's architecture with its own random initialisation, saved as icetk saves it (~391 MiB)."""
    torch.manual_seed(0)
    model = build_icetk_vqvae("cpu").eval()
    with torch.no_grad():  # spread the codebook so that codes differ between pixels
        model.quantize.embed.weight.normal_()
    directory = tmp_path_factory.mktemp("icetk")
    torch.save({"module": model.state_dict()}, directory / ICETK_IMAGE_MODEL)
    yield model, directory
    (directory / ICETK_IMAGE_MODEL).unlink()  # pytest keeps old tmp dirs; do not leave 391 MiB behind


def shape_only_checkpoint(path, state):
    """A tiny file whose tensors have the given shapes (stride-0 views of one number)."""
    torch.save({"module": {k: torch.zeros(()).expand(v.shape) for k, v in state.items()}}, path)


def frames(count=3, size=FRAME):
    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_loads_random_weight_file_and_matches_icetk(reference):
    model, directory = reference
    tokenizer = load_image_tokenizer(directory, frame_size=FRAME)
    assert isinstance(tokenizer, IceImageTokenizer) and isinstance(tokenizer, ImageTokenizer)
    assert (tokenizer.tokens_side, tokenizer.codebook_size) == (4, 20000)
    np.testing.assert_array_equal(tokenizer.codebook(), model.quantize.embed.weight.detach().numpy())

    # icetk's own pipeline: Normalize(mean, std) on [0, 1] pixels, single_encode(l=1),
    # single_decode_code(l=1) then un-normalise
    images = frames()
    mean, std = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        expected_codes = model.single_encode(x, 1)[2]
        expected_pixels = model.single_decode_code(expected_codes, 1) * std + mean
    codes = tokenizer.encode(images)
    assert codes.dtype == np.int64 and codes.shape == (3, 4, 4)
    np.testing.assert_array_equal(codes, expected_codes.numpy())
    assert len(np.unique(codes)) > 1

    decoded = tokenizer.decode(codes)
    expected = (expected_pixels.clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy()
    assert decoded.dtype == np.uint8 and decoded.shape == images.shape
    assert np.abs(decoded.astype(np.float32) - expected).max() <= 0.5 + 1e-3


def test_file_path_and_compression_levels(reference):
    model, directory = reference
    tokenizer = IceImageTokenizer.load(directory / ICETK_IMAGE_MODEL, frame_size=FRAME, compression=16)
    assert tokenizer.tokens_side == 2 and tokenizer.encode(frames(1)).shape == (1, 2, 2)
    with pytest.raises(ValueError, match="multiple of compression=8"):
        IceImageTokenizer(model, frame_size=36)


def test_at_grid_decodes_the_larger_grid_with_the_same_model(reference):
    """DSR's 60 x 60 codes decode to 480 px through the same model (here 4 x 4 -> 12 x 12 at 32 -> 96 px)."""
    model, directory = reference
    low = load_image_tokenizer(directory, frame_size=FRAME)
    high = low.at_grid(12)
    assert (high.frame_size, high.tokens_side) == (96, 12) and high.model is low.model
    codes = np.random.default_rng(1).integers(0, 20000, (1, 12, 12))
    mean, std = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.single_decode_code(torch.from_numpy(codes), 1) * std + mean
    decoded = high.decode(codes)
    assert decoded.shape == (1, 96, 96, 3)
    expected = (expected.clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy()
    assert np.abs(decoded.astype(np.float32) - expected).max() <= 0.5 + 1e-3


def test_bad_frames_and_codes_say_what_was_expected(reference):
    tokenizer = IceImageTokenizer(reference[0], frame_size=FRAME)
    with pytest.raises(ValueError, match=r"expected uint8 \[T, 32, 32, 3\], got uint8 \[1, 40, 40, 3\]"):
        tokenizer.encode(frames(1, 40))
    with pytest.raises(ValueError, match=r"expected uint8 \[T, 32, 32, 3\], got float32"):
        tokenizer.encode(frames(1).astype(np.float32))
    with pytest.raises(ValueError, match=r"expected values in \[0, 20000\), got \[0, 20000\]"):
        tokenizer.decode(np.array([[[0, 20000], [1, 2]]]).repeat(2, 1).repeat(2, 2))


def test_corrupted_or_wrong_checkpoints_are_refused_naming_keys(tmp_path):
    state = build_icetk_vqvae("meta").state_dict()

    missing = dict(state)
    del missing["quantize.embed.weight"], missing["decs.1.conv_out.bias"]
    shape_only_checkpoint(tmp_path / "missing.pt", missing)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"missing.pt: .*2 missing keys: decs.1.conv_out.bias, quantize.embed.weight",
    ):
        IceImageTokenizer.load(tmp_path / "missing.pt")

    extra = dict(state, **{"loss.discriminator.weight": torch.zeros(3)})
    shape_only_checkpoint(tmp_path / "extra.pt", extra)
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected keys: loss.discriminator.weight"):
        IceImageTokenizer.load(tmp_path / "extra.pt")

    misshaped = dict(state, **{"quantize.embed.weight": torch.zeros(16384, 256)})
    shape_only_checkpoint(tmp_path / "misshaped.pt", misshaped)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"1 mis-shaped keys: quantize.embed.weight \(expected \[20000, 256\], got \[16384, 256\]\)",
    ):
        IceImageTokenizer.load(tmp_path / "misshaped.pt")

    torch.save({"module": {"conv.weight": torch.zeros(2)}}, tmp_path / "other_model.pt")
    with pytest.raises(
        CheckpointMismatchError, match=r"329 missing keys: .*\(321 more\); 1 unexpected keys: conv.weight"
    ):
        IceImageTokenizer.load(tmp_path / "other_model.pt")

    torch.save({"state_dict": {}}, tmp_path / "no_module.pt")
    with pytest.raises(
        CheckpointMismatchError, match=r"expected icetk's \{'module': state_dict\}, found \['state_dict'\]"
    ):
        IceImageTokenizer.load(tmp_path / "no_module.pt")

    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointMismatchError, match="truncated.pt: not a readable torch checkpoint"):
        IceImageTokenizer.load(tmp_path / "truncated.pt")


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / ICETK_IMAGE_MODEL)):
        load_image_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_image_tokenizer(tmp_path / "nowhere.safetensors")
    (tmp_path / "frames.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="frames.npy: unknown image tokenizer"):
        load_image_tokenizer(tmp_path / "frames.npy")


def test_torchvision_standin_only_inside_the_block():
    try:
        import torchvision  # noqa: F401

        pytest.skip("the real torchvision is importable here")
    except Exception:
        pass
    before = {name: sys.modules.get(name) for name in STANDIN_MODULES}
    with torchvision_importable():
        from torchvision import transforms
        from torchvision.transforms.functional import pil_to_tensor

        with pytest.raises(RuntimeError, match="stand-in"):
            transforms.Normalize([0.5], [0.5])
        with pytest.raises(RuntimeError, match="stand-in"):
            pil_to_tensor(None)
    assert {name: sys.modules.get(name) for name in STANDIN_MODULES} == before

"""Lesson 07's pieces: the video data (motion, time reversal, soundtrack) and the video models
(tubelet embedding as a 3-D convolution, its gradient, the frame bag's blindness to order)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymm as tm
from tinymm import audio
from tinymm.data import videos
from tinymm.gradcheck import gradcheck
from tinymm.models import ViT
from tinymm.models.video import (
    AudioVisualTransformer,
    FrameBag,
    TubeletEmbedding,
    VideoTransformer,
    stream_tokens,
    tubeletify,
)


@pytest.fixture(scope="module")
def data() -> videos.VideoData:
    return videos.make_videos(24, seed=3)


# --- data ----------------------------------------------------------------------------------------


def object_centre(clip: np.ndarray) -> np.ndarray:
    """(T, H, W, C) clip -> (T, 2) centre (x, y) of the object's pixels, as fractions of the
    side (pixel k's centre at (k + 1/2) / H), y down. Every named colour has a channel >= 0.9,
    the grey background stays below 0.45: a threshold finds the object."""
    mask = clip.max(axis=-1) > 0.6  # (T, H, W)
    rows, cols = np.indices(mask.shape[1:])
    side = mask.shape[1]
    return np.stack([[(cols[m].mean() + 0.5) / side, (rows[m].mean() + 0.5) / side] for m in mask])


def test_the_object_moves_the_way_its_label_says(data):
    """Measured from the pixels: the object's centre moves along COMPASS[direction], and the
    rising label is 1 exactly when it climbs the screen."""
    for i in range(len(data)):
        centre = object_centre(data.clips[i])
        motion = centre[-1] - centre[0]  # (dx, dy), y down
        angle = np.rad2deg(np.arctan2(-motion[1], motion[0]))
        expected = 45.0 * data.direction[i]
        assert abs((angle - expected + 180) % 360 - 180) < 15, (i, angle, expected)
        assert data.rising[i] == (motion[1] < 0)
        np.testing.assert_allclose(centre, data.centres[i], atol=0.02)


def test_time_reversal_flips_the_direction_and_the_label(data):
    back = videos.reverse(data)
    np.testing.assert_array_equal(back.clips, data.clips[:, ::-1])
    np.testing.assert_array_equal(back.direction, (data.direction + 4) % 8)
    np.testing.assert_array_equal(back.rising, 1 - data.rising)
    np.testing.assert_array_equal(back.heights, data.heights[:, ::-1])
    np.testing.assert_array_equal(back.soundtracks, data.soundtracks[:, ::-1])
    names = [videos.COMPASS[d] for d in data.direction[:3]]
    assert [videos.COMPASS[d] for d in back.direction[:3]] == [
        {"north": "south", "south": "north"}.get(n) or _swap(n) for n in names
    ]
    both = videos.with_reversals(data)
    assert len(both) == 2 * len(data)
    np.testing.assert_array_equal(both.clips[len(data) :], back.clips)


@given(
    index=st.one_of(
        st.integers(-12, 11),
        st.builds(
            slice,
            st.none() | st.integers(-14, 14),
            st.none() | st.integers(-14, 14),
            st.none() | st.integers(1, 4),
        ),
        st.lists(st.integers(-12, 11), max_size=8).map(lambda i: np.array(i, dtype=np.int64)),
    )
)
def test_reversed_clips_index_as_the_array_with_reversals_builds(index):
    """with_reversals(copy_clips=False): clips indexed (int, slice, index array) as the copied
    (2N, ...) array, without building it; the gathered clips are copies."""
    data = videos.make_videos(6, 4, frames=3)
    built = videos.with_reversals(data).clips
    virtual = videos.with_reversals(data, copy_clips=False).clips
    assert len(virtual) == len(built) and virtual.shape == built.shape
    got = virtual[index]
    np.testing.assert_array_equal(got, built[index])
    got[...] = -1
    np.testing.assert_array_equal(np.asarray(virtual), built)  # nothing written back


def _swap(name: str) -> str:
    words = {"north": "south", "south": "north", "east": "west", "west": "east"}
    return "-".join(words[w] for w in name.split("-"))


def frame_peaks(wave: np.ndarray, sr: int, frames: int) -> np.ndarray:
    """The loudest frequency (Hz) of each video frame's stretch of the soundtrack: (T,)."""
    seg = len(wave) // frames
    spectra = np.abs(audio.stft(wave, n_fft=seg, hop_length=seg, center=False))  # (F, T)
    return audio.fft_frequencies(sr=sr, n_fft=seg)[spectra.argmax(axis=0)]


def test_the_soundtracks_pitch_follows_the_objects_height(data):
    """The spectral peak of every video frame's stretch of sound sits at F_LOW 2^(3 h) (within a
    frequency bin and the height's change over the frame), and rises when the object does."""
    frames = data.clips.shape[1]
    for i in range(len(data)):
        peaks = frame_peaks(data.soundtracks[i].astype(np.float64), data.sr, frames)
        expected = videos.pitch(data.heights[i])
        np.testing.assert_allclose(peaks, expected, rtol=0.1, atol=2 * data.sr / 500)
        climbing = np.sign(np.diff(data.heights[i]))
        assert np.all(
            np.sign(np.diff(peaks))[np.abs(np.diff(expected)) > 80]
            == climbing[np.abs(np.diff(expected)) > 80]
        )


def test_generators_are_deterministic():
    a, b = videos.make_videos(4, seed=7), videos.make_videos(4, seed=7)
    c = videos.make_videos(4, seed=8)
    np.testing.assert_array_equal(a.clips, b.clips)
    np.testing.assert_array_equal(a.soundtracks, b.soundtracks)
    np.testing.assert_array_equal(a.direction, b.direction)
    assert not np.array_equal(a.clips, c.clips)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n": -1}, "n must be >= 0"),
        ({"frames": 1}, "frames must be >= 2"),
        ({"image_size": 8}, "image_size must be >= 16"),
        ({"frames": 40}, "do not fit"),
        ({"directions": [9]}, "indices into COMPASS"),
        ({"sr": 0}, "sr=0"),
    ],
)
def test_bad_generator_arguments_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        videos.make_videos(**{"n": 2, **kwargs})


# --- models --------------------------------------------------------------------------------------


def conv3d_stride_kernel(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A plain 3-D convolution, channels-last, stride = kernel, no padding, by loops:
    out[n, a, b, c, o] = bias[o] + sum_{i, j, k, ch} x[n, a t + i, b p + j, c p + k, ch]
                                                     * weight[i, j, k, ch, o]
    x (N, T, H, W, C), weight (t, p, p, C, O) -> (N, T/t, H/p, W/p, O)."""
    t, p, _, _, o = weight.shape
    n, frames, h, w, _ = x.shape
    out = np.zeros((n, frames // t, h // p, w // p, o))
    for a in range(frames // t):
        for b in range(h // p):
            for c in range(w // p):
                block = x[:, a * t : (a + 1) * t, b * p : (b + 1) * p, c * p : (c + 1) * p]
                for i in range(t):
                    for j in range(p):
                        for k in range(p):
                            out[:, a, b, c] += block[:, i, j, k] @ weight[i, j, k]
    return out + bias


def test_tubelet_embedding_is_a_3d_convolution_with_stride_equal_to_kernel():
    rng = np.random.default_rng(0)
    n, frames, size, c, t, p, d = 2, 4, 8, 3, 2, 4, 5
    x = rng.standard_normal((n, frames, size, size, c))
    embed = TubeletEmbedding(frames, size, (t, p), c, d)
    tokens = embed.tubelet_embedding(tubeletify(tm.tensor(x), (t, p))).data  # (N, L, D)
    weight = embed.tubelet_embedding.weight.data.astype(np.float64)  # E: (t p p C, D)
    conv = conv3d_stride_kernel(
        x, weight.reshape(t, p, p, c, d), embed.tubelet_embedding.bias.data.astype(np.float64)
    )
    np.testing.assert_allclose(tokens, conv.reshape(n, -1, d), rtol=1e-5, atol=1e-5)


def test_tubelet_embedding_gradient():
    """Gradients of the clip, E, its bias, E_space and E_time, against finite differences."""
    rng = np.random.default_rng(1)
    embed = TubeletEmbedding(4, 4, (2, 2), 2, 3)
    for q in embed.parameters():
        q.data = q.data.astype(np.float64)
    x = tm.tensor(rng.standard_normal((2, 4, 4, 4, 2)), requires_grad=True, dtype=np.float64)
    assert gradcheck(lambda x, *params: embed(x), [x, *embed.parameters()])


@given(st.permutations(range(8)), st.integers(0, 2**16))
def test_frame_bag_is_blind_to_the_order_of_frames(order, seed):
    tm.manual_seed(0)
    model = FrameBag(16, 8, dim=16, depth=1, heads=2, mlp_ratio=2, num_classes=3)
    clips = np.random.default_rng(seed).uniform(size=(2, 8, 16, 16, 3)).astype(np.float32)
    with tm.no_grad():
        a = model(clips).data
        b = model(clips[:, list(order)]).data
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_video_transformer_is_not_blind_to_order():
    tm.manual_seed(0)
    model = VideoTransformer(8, 16, (2, 8), dim=16, depth=1, heads=2, num_classes=3)
    clips = np.random.default_rng(0).uniform(size=(2, 8, 16, 16, 3)).astype(np.float32)
    with tm.no_grad():
        assert np.abs(model(clips).data - model(clips[:, ::-1]).data).max() > 1e-4


def test_audio_visual_model_fuses_both_streams_and_names_bad_inputs():
    tm.manual_seed(0)
    video_encoder = VideoTransformer(4, 16, (2, 8), dim=16, depth=1, heads=2, num_classes=16)
    sound_encoder = ViT((8, 16), 4, channels=1, dim=16, depth=1, heads=2, num_classes=16)
    model = AudioVisualTransformer(dim=16, depth=1, heads=2)
    clips = np.random.default_rng(0).uniform(size=(3, 4, 16, 16, 3)).astype(np.float32)
    mels = np.random.default_rng(1).standard_normal((3, 8, 16, 1)).astype(np.float32)
    video, sound = stream_tokens(video_encoder, clips), stream_tokens(sound_encoder, mels)
    assert video.shape == (3, 1 + 2 * 2 * 2, 16) and sound.shape == (3, 1 + 2 * 4, 16)
    np.testing.assert_allclose(  # the first token is the encoder's embedding of the input
        video.data[:, 0], video_encoder(clips).data, rtol=1e-5, atol=1e-6
    )
    assert model.encode(video, sound).shape == (3, 1 + 9 + 9, 16)
    logits = model(video, sound).data
    assert logits.shape == (3, 2)
    # the answer depends on which soundtrack goes with which clip
    assert np.abs(model(video, sound.data[::-1]).data - logits).max() > 1e-5
    with pytest.raises(ValueError, match=r"audio_tokens must be \(N, L, 16\)"):
        model(video, np.zeros((3, 9, 8), np.float32))
    with pytest.raises(ValueError, match="3 clips but 2 soundtracks"):
        model(video, sound[:2])
    with pytest.raises(ValueError, match="build it with num_classes = dim"):
        stream_tokens(VideoTransformer(4, 16, (2, 8), dim=16, depth=1, heads=2), clips)


def test_bad_tubelets_and_clips_are_named():
    with pytest.raises(ValueError, match=r"tubelet \(t=3, p=8\) does not divide"):
        VideoTransformer(8, 16, (3, 8))
    with pytest.raises(ValueError, match="does not divide the clip's 8 frames of 16x12"):
        tubeletify(np.zeros((1, 8, 16, 12, 3)), (2, 8))
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        VideoTransformer(8, 16, (2, 8), num_classes=0)
    with pytest.raises(ValueError, match=r"expected clips of shape \(N, 8, 16, 16, 3\)"):
        VideoTransformer(8, 16, (2, 8))(np.zeros((1, 8, 16, 16, 1), np.float32))

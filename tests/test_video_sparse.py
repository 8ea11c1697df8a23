"""mlmm.data.video: the sparse decoder returns the decode-all path's frames bit for bit (real MSR-VTT / MSVD clips and
generated B-frame / multi-GOP clips), declines what it cannot prove exact, and the write-time transcode keeps the
documented source frames."""
import io
from pathlib import Path

import av
import numpy as np
import pytest

from mlmm.data.transforms import sample_indices
from mlmm.data.video import decode_plan, sample_frames_sparse, transcode_frame_indices, transcode_video

SHARED_VIDEO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "video"
BITS = 8  # frame index written into each generated frame as 8 black / white blocks


def all_frames(data: bytes) -> list[np.ndarray]:
    """Reference: decode every frame (presentation order), RGB."""
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def indexed_clip(n: int, fps: int = 25, codec: str = "libx264", fmt: str = "mp4", x264: str = "", w=160, h=96):
    """A clip whose frame i shows i in binary (blocks), plus moving texture so that P/B frames carry residuals."""
    rng = np.random.default_rng(n)
    texture = rng.integers(0, 255, (h, w * 2, 3), dtype=np.uint8)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if x264:
            s.options = {"preset": "ultrafast", "crf": "20", "x264-params": x264}
        for i in range(n):
            img = texture[:, i % w:i % w + w].copy()
            for b in range(BITS):
                img[: h // 3, b * w // BITS:(b + 1) * w // BITS] = 255 if (i >> b) & 1 else 0
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return buf.getvalue()


def read_index(rgb: np.ndarray) -> int:
    h, w = rgb.shape[:2]
    top = rgb[: h // 3].mean(axis=(0, 2))  # [W]
    return sum(1 << b for b in range(BITS) if top[b * w // BITS:(b + 1) * w // BITS].mean() > 127)


def check_exact(data: bytes, counts=(1, 8, 13)):
    ref = all_frames(data)
    for t in counts:
        got = sample_frames_sparse(data, lambda n, t=t: sample_indices(n, t))
        assert got is not None
        frames, n = got
        assert n == len(ref)
        for frame, i in zip(frames, sample_indices(n, t)):
            assert np.array_equal(frame, ref[i]), (t, i)
    return ref


@pytest.mark.skipif(not SHARED_VIDEO.is_dir(), reason="../shared/data/video not present")
@pytest.mark.parametrize("name", ["video8105.mp4", "video9149.mp4", "jPBxl9gFqNY_110_117.avi"])
def test_sparse_frames_equal_decode_all_on_real_clips(name):
    check_exact((SHARED_VIDEO / name).read_bytes())


def test_sparse_on_b_frames_and_many_gops_decodes_less_and_exactly(monkeypatch):
    # B-pyramid (some B-frames are references, the others not) and an IDR frame every 12 frames
    data = indexed_clip(60, x264="keyint=12:min-keyint=12:scenecut=0:bframes=3:b-pyramid=normal")
    ref = check_exact(data, counts=(1, 3, 8, 60))
    assert [read_index(f) for f in ref] == list(range(60))  # the clip is what it claims
    fed = []
    real_plan = decode_plan
    monkeypatch.setattr("mlmm.data.video.decode_plan", lambda info, wanted: fed.append(real_plan(info, wanted))
                        or fed[-1])
    frames, n = sample_frames_sparse(data, lambda n: sample_indices(n, 3))
    assert [read_index(f) for f in frames] == sample_indices(60, 3) == [0, 30, 59]
    # frame 0 alone, 30 after its IDR at 24, 59 after the IDR at 48 (minus the unreferenced B-frames in between)
    assert len(fed[0]) < 1 + 7 + 12


def test_decode_plan_skips_gops_tails_and_unreferenced_frames():
    # decode order: I0 P3 b1 b2 | I4 P7 b5 b6 | I8 ...; (display index, IDR, referenced)
    info = [(0, True, True), (3, False, True), (1, False, False), (2, False, False),
            (4, True, True), (7, False, True), (5, False, False), (6, False, False),
            (8, True, True), (9, False, True)]
    assert decode_plan(info, {2}) == [0, 1, 3]  # b2 needs I0 and P3, not b1
    assert decode_plan(info, {0, 9}) == [0, 8, 9]  # the middle GOP is never decoded
    assert decode_plan(info, {5, 6}) == [4, 5, 6, 7]


def test_sparse_declines_what_it_cannot_prove_exact():
    mpeg4 = indexed_clip(20, codec="mpeg4")
    assert sample_frames_sparse(mpeg4, lambda n: sample_indices(n, 4)) is None  # not H.264: decode everything
    assert sample_frames_sparse(b"not a video", lambda n: [0]) is None
    # MPEG-TS stores no frame count: declined (the decode-all path handles it) ...
    ts = indexed_clip(30, fmt="mpegts", x264="keyint=10:min-keyint=10:scenecut=0:bframes=2")
    assert sample_frames_sparse(ts, lambda n: sample_indices(n, 4)) is None
    # ... but its Annex B packets (start codes instead of lengths) parse: an IDR first, a slice in every packet
    from mlmm.data.video import _nal_headers

    with av.open(io.BytesIO(ts)) as c:
        heads = [_nal_headers(bytes(p), None) for p in c.demux(c.streams.video[0]) if p.size]
    assert len(heads) == 30 and 5 in [h & 0x1F for h in heads[0]]
    assert all({1, 5} & {h & 0x1F for h in hs} for hs in heads)
    assert _nal_headers(b"\x00\x00\x00\x09\x65", 4) is None  # a length past the packet's end


def test_transcode_keeps_the_documented_source_frames_and_size():
    data = indexed_clip(50, fps=25, w=320, h=240)
    out, info = transcode_video(data, fps=3, size=128)
    kept = transcode_frame_indices(50, 25.0, 3)
    assert kept == [0, 8, 17, 25, 33, 42] and info["frames"] == len(kept) and info["source_frames"] == 50
    assert info["size"] == [170, 128] and info["source_size"] == [320, 240] and info["gop"] == 1
    frames = all_frames(out)
    assert [read_index(f) for f in frames] == kept and frames[0].shape == (128, 170, 3)
    with av.open(io.BytesIO(out)) as c:
        assert float(c.streams.video[0].average_rate) == 3.0
    # all-intra: the sparse decoder decodes only the sampled frames, and they are the ones stated in the doc
    got, n = sample_frames_sparse(out, lambda n: sample_indices(n, 4))
    assert n == len(kept) and [read_index(f) for f in got] == [kept[i] for i in sample_indices(len(kept), 4)]
    # at or below the target rate and size: every frame kept, nothing upscaled
    same, info2 = transcode_video(indexed_clip(10, fps=2), fps=3, size=512)
    assert info2["frames"] == 10 and info2["size"] == [160, 96]
    with pytest.raises(ValueError, match="fps must be > 0"):
        transcode_video(data, fps=0)
    with pytest.raises(ValueError, match="cannot decode|no video"):
        transcode_video(b"garbage", fps=3)


@pytest.mark.parametrize("normalize", [True, False])
def test_decode_video_takes_the_sparse_path_and_gives_the_decode_all_tensors(monkeypatch, normalize):
    """decode_video (what the loader and the evaluator call) = its decode-all path, crops and rng draws included."""
    import random

    import torch

    import mlmm.data.video as video
    from mlmm.data.transforms import decode_video

    clips = [indexed_clip(40, x264="keyint=9:min-keyint=9:scenecut=0:bframes=3", w=176, h=128)]
    if SHARED_VIDEO.is_dir():
        clips.append((SHARED_VIDEO / "video9462.mp4").read_bytes())
    calls = []
    real = video.sample_frames_sparse
    monkeypatch.setattr(video, "sample_frames_sparse", lambda *a, **k: calls.append(1) or real(*a, **k))
    for data in clips:
        for train in (False, True):
            fast = decode_video(data, 8, 64, train=train, rng=random.Random(3), normalize=normalize)
            with monkeypatch.context() as m:
                m.setattr(video, "sample_frames_sparse", lambda *a, **k: None)  # force the decode-all path
                plain = decode_video(data, 8, 64, train=train, rng=random.Random(3), normalize=normalize)
            assert fast.shape == (8, 3, 64, 64) and fast.dtype == (torch.float32 if normalize else torch.uint8)
            assert torch.equal(fast, plain)
    assert len(calls) == 2 * len(clips)


def test_write_shards_transcodes_videos_once_and_records_what_it_did(tmp_path, monkeypatch):
    """write_shards(video_fps=, video_size=) stores the re-encoded mp4 (+ what was done in the json); the reader
    then samples the documented source frames from it. A clip that cannot be transcoded is a counted skip."""
    import json
    import tarfile

    from mlmm.data.write_shards import main as write_main
    from mlmm.data.write_shards import write_shards

    (tmp_path / "clip.avi").write_bytes(indexed_clip(50, fps=25, codec="mpeg4", fmt="avi", w=320, h=240))
    (tmp_path / "bad.mp4").write_bytes(indexed_clip(5)[:400])  # a header, no frames
    rows = [{"key": "c", "video": "clip.avi", "captions": {"en": "x"}},
            {"key": "b", "video": "bad.mp4", "captions": {"en": "y"}}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = write_shards(tmp_path / "m.jsonl", tmp_path / "out", progress=False, video_fps=3, video_size=128)
    assert index["n_samples"] == 1 and [s["key"] for s in index["skipped"]] == ["b"]
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("c.json").read())
        out = tar.extractfile("c.mp4").read()
    assert sorted(names) == ["c.json", "c.mp4"]  # an avi source is stored as the transcoded mp4
    kept = transcode_frame_indices(50, 25.0, 3)
    assert meta["video_transcode"]["frames"] == len(kept) and meta["video_transcode"]["size"] == [170, 128]
    got, n = sample_frames_sparse(out, lambda n: sample_indices(n, 4))
    assert n == len(kept) and [read_index(f) for f in got] == [kept[i] for i in sample_indices(len(kept), 4)]
    # without the options the bytes are stored as they are; the CLI passes them through and checks them
    write_shards(tmp_path / "m.jsonl", tmp_path / "plain", progress=False)
    with tarfile.open(tmp_path / "plain" / "shard-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["c.avi", "c.json"]
    write_main(["--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "cli"), "--video-fps", "3"])
    with tarfile.open(tmp_path / "cli" / "shard-000000.tar") as tar:
        assert json.loads(tar.extractfile("c.json").read())["video_transcode"]["size"] == [320, 240]
    with pytest.raises(ValueError, match="video_fps must be > 0"):
        write_shards(tmp_path / "m.jsonl", tmp_path / "x", video_fps=0)
    import mlmm.data.video as video

    def fail(data, fps=None, size=None):
        raise ValueError("video stream has no frame rate")

    monkeypatch.setattr(video, "transcode_video", fail)
    index = write_shards(tmp_path / "m.jsonl", tmp_path / "y", progress=False, video_fps=3)
    assert index["n_samples"] == 0 and "not transcoded: video stream has no frame rate" in index["skipped"][0]["reason"]

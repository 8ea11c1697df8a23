"""Exact sparse video decoding: decode only the packets that the sampled frames need (H.264), with PyAV.

    got = sample_frames_sparse(data, num_frames)    # None: not provably exact here, decode every frame instead
    frames, n = got                                  # RGB uint8 [H, W, 3] at sample_indices(n, num_frames)

The plain way (``decode_video``'s decode-all path) decodes every frame of a clip to keep ``num_frames`` of them:
250-900 frames for 8 on 10-30 s clips. Here the packets are demuxed first (no decoding), and only these reach the
decoder:

* per GOP that holds a sampled frame, the packets from its IDR frame up to the last sampled frame of the GOP, in
  decode order; GOPs without a sampled frame and the tail of a GOP after its last sampled frame are never decoded
  (an IDR frame starts from a clean slate: nothing after it references anything before it). This is what a seek
  would do, without a seek's re-demuxing.
* within that range, a frame that is not sampled and that no other frame references (H.264 ``nal_ref_idc == 0``,
  typically most B-frames) is skipped too.

Every frame that is decoded sees exactly the reference frames it sees in a full decode, so the sampled frames are
bit-identical to the decode-all path's, and so are their indices: frame ``i`` is the i-th frame in presentation
(pts) order of the stream's packets, as in the decode-all path when every frame decodes. Anything that would make
this unprovable returns None and the caller decodes everything: another codec than H.264, a first packet that is
not an IDR frame, a missing or repeated pts, a container without a frame count or with one that disagrees with its
packets, an unparsable packet, or a sampled frame that did not come out of the decoder.
``tests/test_video_sparse.py`` checks the frames against the decode-all path on the real MSR-VTT / MSVD clips and on
generated ones.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np

H264_IDR, H264_SLICE = 5, 1  # nal_unit_type of an IDR slice and of a non-IDR slice


def _nal_headers(payload: bytes, length_size: Optional[int]) -> Optional[list[int]]:
    """First byte of every NAL unit of one H.264 packet (AVCC length-prefixed, or Annex B when ``length_size`` is
    None); None when the lengths do not add up to the packet."""
    heads = []
    if length_size is None:
        start = payload.find(b"\x00\x00\x01")
        while start >= 0:
            if start + 3 < len(payload):
                heads.append(payload[start + 3])
            start = payload.find(b"\x00\x00\x01", start + 3)
        return heads or None
    pos = 0
    while pos < len(payload):
        if pos + length_size > len(payload):
            return None
        size = int.from_bytes(payload[pos:pos + length_size], "big")
        pos += length_size
        if size == 0 or pos + size > len(payload):
            return None
        heads.append(payload[pos])
        pos += size
    return heads or None


def _avcc_length_size(extradata: Optional[bytes]) -> Optional[int]:
    """NAL length size from an avcC record (1, 2 or 4), None for Annex B streams (no avcC)."""
    if extradata and len(extradata) >= 7 and extradata[0] == 1:
        return (extradata[4] & 3) + 1
    return None


def decode_plan(packet_info: list[tuple[int, bool, bool, bool]], wanted: set[int]) -> list[int]:
    """Positions (decode order) of the packets to decode so that every wanted frame comes out.

    Args:
        packet_info: per packet in decode order, ``(display index, starts a GOP at an IDR frame, is referenced
            (nal_ref_idc > 0))``, see :func:`sample_frames_sparse`.
        wanted: display indices of the sampled frames.
    """
    starts = [pos for pos, (_, idr, _) in enumerate(packet_info) if idr] + [len(packet_info)]
    plan: list[int] = []
    for a, b in zip(starts[:-1], starts[1:]):
        hits = [pos for pos in range(a, b) if packet_info[pos][0] in wanted]
        if hits:
            last = max(hits)
            plan.extend(pos for pos in range(a, last + 1) if packet_info[pos][2] or packet_info[pos][0] in wanted)
    return plan


def sample_frames_sparse(data: bytes, indices_for, thread_type: str = "AUTO", check_size=None
                         ) -> Optional[tuple[list[np.ndarray], int]]:
    """Decode only what the sampled frames need; None when that is not provably exact (see the module doc).

    Args:
        data: encoded video bytes.
        indices_for: ``n_frames -> list of display indices`` (e.g. ``lambda n: sample_indices(n, 8)``).
        check_size: ``(width, height) -> None``, called before anything is decoded; it may raise (e.g. a
            decompression-bomb limit).
    Returns:
        (RGB uint8 [H, W, 3] frames in the order of ``indices_for(n)``, n), or None.
    """
    import av

    try:
        container = av.open(io.BytesIO(data))
    except (av.error.FFmpegError, OSError, ValueError):
        return None  # the decode-all path reports it
    with container:
        if not container.streams.video:
            return None
        stream = container.streams.video[0]
        cc = stream.codec_context
        if check_size is not None:
            check_size(cc.width or 0, cc.height or 0)
        if cc.name != "h264":
            return None
        length_size = _avcc_length_size(cc.extradata)
        try:
            packets = [p for p in container.demux(stream) if p.size > 0]  # decode order, nothing decoded
        except (av.error.FFmpegError, OSError, ValueError):
            return None
        n = len(packets)
        if n == 0 or int(stream.frames or 0) != n:  # no frame count (or a wrong one): the decode-all path
            return None
        pts = [p.pts for p in packets]
        if any(t is None for t in pts) or len(set(pts)) != n:
            return None
        display = {t: i for i, t in enumerate(sorted(pts))}
        info = []
        for p in packets:
            heads = _nal_headers(bytes(p), length_size)
            if heads is None:
                return None
            vcl = [h for h in heads if h & 0x1F in (H264_SLICE, H264_IDR)]
            if not vcl:
                return None  # a packet without a picture: leave such streams to the full decode
            idr = p.is_keyframe and all(h & 0x1F == H264_IDR for h in vcl)
            info.append((display[p.pts], idr, any(h >> 5 & 3 for h in vcl)))
        if not info[0][1]:
            return None
        indices = [int(i) for i in indices_for(n)]
        wanted = set(indices)
        cc.thread_type = thread_type
        rgb: dict[int, np.ndarray] = {}

        def keep(frames):
            for frame in frames:
                i = display.get(frame.pts)
                if i in wanted and i not in rgb:
                    rgb[i] = frame.to_ndarray(format="rgb24")  # [H, W, 3], the same conversion as to_image()

        try:
            for pos in decode_plan(info, wanted):
                keep(cc.decode(packets[pos]))
            keep(cc.decode(None))  # drain the decoder's reorder buffer
        except (av.error.FFmpegError, OSError, ValueError):
            return None
    if len(rgb) != len(wanted):
        return None
    return [rgb[i] for i in indices], n


# ------------------------------------------------------------------------------------------ write-time transcode
def transcode_frame_indices(n_source: int, source_fps: float, fps: Optional[float]) -> list[int]:
    """Source frames kept by :func:`transcode_video`: frame k of the new clip is source frame round(k * F / fps)."""
    if fps is None or fps >= source_fps:
        return list(range(n_source))
    step = source_fps / fps
    return [int(round(k * step)) for k in range(int((n_source - 1) / step + 0.5) + 1) if round(k * step) < n_source]


def transcode_video(data: bytes, fps: Optional[float] = None, size: Optional[int] = None, gop: int = 1,
                    crf: int = 18, preset: str = "veryfast") -> tuple[bytes, dict]:
    """Re-encode a clip once, at shard-writing time, so that every epoch decodes less: -> (mp4 bytes, info).

    * ``fps``: keep source frames ``round(k * F / fps)`` (F = the source frame rate; fewer frames only: a clip at
      or below ``fps`` keeps every frame). Training then samples its frames uniformly from this stream: frame
      ``i`` the model sees is source frame ``transcode_frame_indices(...)[sample_indices(len(kept), T)[i]]``,
      not ``sample_indices(n_source, T)[i]``.
    * ``size``: shorter side scaled down to ``size`` (never up; even sides, as yuv420p needs), swscale bicubic.
    * H.264 (libx264, ``crf``, no B-frames) with an IDR frame every ``gop`` frames (1: every frame), so that the
      sparse decoder (:func:`sample_frames_sparse`) decodes at most ``gop`` frames per sampled frame.

    ``info`` records what was done (source frame count, rate and size, kept indices) for the sample's json.
    Raises ValueError when the clip cannot be read or has no frame rate.
    """
    import fractions

    import av

    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if size is not None and size < 2:
        raise ValueError(f"size must be >= 2, got {size}")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = list(container.decode(stream))  # presentation order
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video for transcoding: {e}") from e
    if not frames:
        raise ValueError("video has no decodable frames")
    if not rate or rate <= 0:
        raise ValueError("video stream has no frame rate: cannot resample it to --video-fps")
    keep = transcode_frame_indices(len(frames), float(rate), fps)
    w, h = frames[0].width, frames[0].height
    if size is not None and min(w, h) > size:
        scale = size / min(w, h)
        w, h = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
    else:
        w, h = w // 2 * 2, h // 2 * 2
    out_rate = fractions.Fraction(fps).limit_denominator(1001) if fps is not None and fps < float(rate) else rate
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=out_rate)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"crf": str(crf), "preset": preset,
                      "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"}
        for k, j in enumerate(keep):
            frame = frames[j].reformat(width=w, height=h, format="yuv420p", interpolation="BICUBIC")
            frame.pts, frame.time_base = k, vs.codec_context.time_base or fractions.Fraction(1) / out_rate
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
    info = {"fps": float(out_rate), "frames": len(keep), "size": [w, h], "gop": gop, "source_fps": float(rate),
            "source_frames": len(frames), "source_size": [frames[0].width, frames[0].height]}
    return buf.getvalue(), info

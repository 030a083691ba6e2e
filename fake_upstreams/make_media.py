"""`python -m fake_upstreams.make_media`: regenerate the fake Plex's demo media (fake_upstreams/media/).

Three fragmented MP4 files, 12 s each, made from ffmpeg's generators (`testsrc2` + a 440 Hz `sine`) and
committed (~400 KB), so neither the tests nor the demo need ffmpeg:

- `video.mp4`: H.264 only, 426x240, 25 fps, a keyframe (and a fragment) every 4 s: the DASH/HLS video stream;
- `audio.mp4`: AAC-LC only, 32 kHz mono, a fragment every 4 s (4 s is exactly 125 AAC frames at 32 kHz,
  so a loop of the fragments has no gap): the DASH/HLS audio stream;
- `muxed.mp4`: both, one fragment per 4 s: the direct-play file.

`fake_upstreams.media` serves each as an init segment plus fragments repeated with shifted timestamps,
for as long as an item lasts. Needs Debian's `ffmpeg`; checks the result with `ffprobe`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEDIA_DIR = Path(__file__).resolve().parent / "media"
SECONDS = 12  # media.CLIP_SECONDS
FRAGMENTED = ["-movflags", "+frag_keyframe+empty_moov+default_base_moof", "-fflags", "+bitexact",
              "-map_metadata", "-1"]
VIDEO_SOURCE = ["-f", "lavfi", "-i", f"testsrc2=size=426x240:rate=25:duration={SECONDS}"]
AUDIO_SOURCE = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=32000:duration={SECONDS}"]
X264 = ["-c:v", "libx264", "-threads", "1", "-profile:v", "main", "-bf", "0", "-g", "100", "-keyint_min", "100",
        "-sc_threshold", "0", "-b:v", "90k", "-maxrate", "120k", "-bufsize", "240k", "-pix_fmt", "yuv420p"]


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def probe(path: Path) -> list[dict]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries",
                          "stream=codec_name,profile,width,height,sample_rate,duration", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["streams"]


def main(out_dir: Path = MEDIA_DIR) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        video, audio = Path(tmp) / "video.mp4", Path(tmp) / "audio.mp4"
        ffmpeg(*VIDEO_SOURCE, "-an", *X264, *FRAGMENTED, str(video))
        ffmpeg(*AUDIO_SOURCE, "-c:a", "aac", "-b:a", "32k", "-ac", "1", "-frag_duration", "4000000",
               *FRAGMENTED, str(audio))
        ffmpeg("-i", str(video), "-i", str(audio), "-map", "0:v", "-map", "1:a", "-c", "copy", "-t", str(SECONDS),
               *FRAGMENTED, str(out_dir / "muxed.mp4"))
        (out_dir / "video.mp4").write_bytes(video.read_bytes())
        (out_dir / "audio.mp4").write_bytes(audio.read_bytes())
    expected = {"video.mp4": ["h264"], "audio.mp4": ["aac"], "muxed.mp4": ["h264", "aac"]}
    for name, codecs in expected.items():
        streams = probe(out_dir / name)
        if [s["codec_name"] for s in streams] != codecs:
            print(f"{name}: unexpected streams {streams}", file=sys.stderr)
            return 1
        print(f"{out_dir / name}: {(out_dir / name).stat().st_size} bytes, "
              + ", ".join(f"{s['codec_name']} {s.get('profile', '')}".strip() for s in streams))
    return 0


if __name__ == "__main__":
    sys.exit(main())

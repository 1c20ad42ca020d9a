"""The small default model's codec: WORLD vocoder features, one k-means codebook (issue 7 part A).

Contract for the speech-decoder training (issue 7 part B) — stable, code against it:

    from training.codec import load_codec_encoder

    codec = load_codec_encoder(codec_dir)   # codec_dir = <model dir>/codec (model.json + final.pt)
    tokens = codec.encode_wav(samples, rate_hz)
    #   samples: np.ndarray float32 [S], mono, any rate (resampled to codec.sample_rate_hz);
    #   returns np.ndarray int64 [T], every id in [0, codec.n_codes),
    #   T = ceil(S_at_codec_rate / codec.samples_per_token) (the tail is zero-padded);
    #   deterministic (same samples -> same ids).
    pcm = codec.decode(tokens)
    #   tokens: np.ndarray / list of ints [T]; returns np.ndarray float32
    #   [T * codec.samples_per_token] in [-1, 1] at codec.sample_rate_hz (24 kHz, the engine's rate).

    codec.n_codes            # vocabulary of the speech decoder's codec ids (decoder odim), 1024
    codec.samples_per_token  # samples of output audio per id at sample_rate_hz
    codec.sample_rate_hz     # 24000
    codec.tokens_per_s       # sample_rate_hz / samples_per_token

The values of n_codes, samples_per_token and the token rate are read from `codec_dir/model.json`
(`"codec_type": "world_vq"`); never hard-code them. The same folder is what the engine loads
(`quantized_models.world_codec`), so ids produced here decode identically in the engine.
A missing folder or file raises `quantized_models.errors.ModelLoadError` with the path.

`freeze-omni train codec --out DIR` writes DIR/codec/; `freeze-omni eval codec --codec-dir DIR/codec`
measures pocketsphinx WER of resyntheses vs. the original piper audio. The trained codebook of
the default model is committed under `training/artifacts/codec/`.
"""
from __future__ import annotations

from training.codec.api import CodecEncoder, load_codec_encoder

__all__ = ["CodecEncoder", "load_codec_encoder"]

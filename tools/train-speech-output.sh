#!/usr/bin/env bash
# The speech-output recipe (training issue part 2, after the codec): tts-decoder, tts-prefix,
# export beside the codec, `say`, evaluation. Every step resumes when re-run with the same WORK.
#   bash tools/train-speech-output.sh WORK_DIR CODEC_DIR [MODEL_OUT]
# Sizes are for a shared 2-core CPU (see training/README.md, "Speech output"); raise them on a GPU
# (DEVICE=cuda runs the training steps there).
set -euo pipefail
WORK=${1:?usage: train-speech-output.sh WORK_DIR CODEC_DIR [MODEL_OUT]}
CODEC=${2:?usage: train-speech-output.sh WORK_DIR CODEC_DIR [MODEL_OUT]}
OUT=${3:-$WORK/model}
BANK=${BANK:-training/data/banks/full-seed0.texts.json}
# DECODER_INIT: a kept tts-decoder result (tools/keep-stage-result.py) to continue from
# (DECODER_LR: its peak learning rate; a continuation restarts the warmup and cosine decay).
INIT_ARGS=()
[ -n "${DECODER_INIT:-}" ] && INIT_ARGS=(--init "$DECODER_INIT")
PAIR_ARGS=()
# PAIRS_FROM: kept speech pairs (tools/keep-pairs.py) so only texts they lack are spoken and encoded;
# the committed archive is used when present (it must come from CODEC_DIR's codec); PAIRS_FROM= speaks all.
PAIRS_FROM=${PAIRS_FROM-training/artifacts/speech-output/pairs.jsonl.gz}
[ -n "$PAIRS_FROM" ] && [ -f "$PAIRS_FROM" ] && PAIR_ARGS+=(--pairs-from "$PAIRS_FROM")
# EXTRA_BANKS: further text banks whose train texts the decoder also learns (texts BANK holds out for
# valid or test are left out); EXTRA_BANKS= uses BANK alone.
EXTRA_BANKS=${EXTRA_BANKS-training/data/banks/full-seed1.texts.json}
[ -n "$EXTRA_BANKS" ] && PAIR_ARGS+=(--extra-data $EXTRA_BANKS)
# GUIDED_HEADS: heads of each decoder layer (but the first) whose attention over the text is pulled
# toward the text-speech diagonal (guided attention) in every tts-decoder run; default 2 from scratch,
# 0 with DECODER_INIT (the kept decoder learned without it, and adding it to its continuation measured
# worse; training/README.md, "Guided attention").
GUIDED_HEADS=${GUIDED_HEADS-$([ -n "${DECODER_INIT:-}" ] && echo 0 || echo 2)}
# TARGETS: where the pairs' codec ids come from (--targets of tts-decoder; tts-prefix follows its
# decoder): speech (the codec's encoding of piper's audio) or voice-units (piper-unit codec only:
# the voice's own units).
TARGETS=${TARGETS:-speech}
PAIR_ARGS+=(--targets "$TARGETS")
# TRANSITION_WEIGHT: loss weight of the targets that change the codec id in every tts-decoder run
# (default 1; 3 measured best on the piper-unit codec, whose ids repeat while a sound holds;
# training/README.md, "Weighting the id changes").
PAIR_ARGS+=(--transition-weight "${TRANSITION_WEIGHT:-1}")
mkdir -p "$WORK"
[ -f "$WORK/tts-decoder/result.pt" ] || freeze-omni train tts-decoder --data "$BANK" --codec-dir "$CODEC" \
    --out "$WORK/tts-decoder" --speech-cache "$WORK/speech" --train-limit "${TRAIN_TEXTS:-3000}" \
    --steps "${DECODER_STEPS:-3000}" --batch 8 --ffn 288 --lr "${DECODER_LR:-2e-3}" --warmup-steps 50 --checkpoint-every 25 \
    --max-codec-tokens "${MAX_CODEC_TOKENS:-400}" --device "${DEVICE:-cpu}" --threads "${THREADS:-1}" \
    --guided-heads "$GUIDED_HEADS" "${INIT_ARGS[@]}" "${PAIR_ARGS[@]}"
# OWN_INPUT_RATES: continuations of the decoder on its own greedy predictions as inputs (scheduled
# sampling), one per rate, OWN_INPUT_STEPS each; the engine feeds back the decoder's own ids, and a
# purely teacher-forced decoder drifts (training/README.md). OWN_INPUT_RATES= leaves them out.
DECODER="$WORK/tts-decoder"
RATE=0
for RATE in ${OWN_INPUT_RATES-0.5 0.9}; do
    RUN="$WORK/tts-decoder-own-$RATE"
    mkdir -p "$RUN"
    [ -f "$RUN/pairs.jsonl" ] || cp "$DECODER/pairs.jsonl" "$RUN/pairs.jsonl"  # speak and encode nothing twice
    [ -f "$RUN/result.pt" ] || freeze-omni train tts-decoder --data "$BANK" --codec-dir "$CODEC" --init "$DECODER" \
        --out "$RUN" --speech-cache "$WORK/speech" --train-limit "${TRAIN_TEXTS:-3000}" --own-input-rate "$RATE" \
        --steps "${OWN_INPUT_STEPS:-2000}" --batch 8 --lr 1e-3 --warmup-steps 50 --checkpoint-every 25 \
        --max-codec-tokens "${MAX_CODEC_TOKENS:-400}" --device "${DEVICE:-cpu}" --threads "${THREADS:-1}" \
        --guided-heads "$GUIDED_HEADS" "${PAIR_ARGS[@]}"
    DECODER="$RUN"
done
[ -f "$WORK/tts-prefix/result.pt" ] || freeze-omni train tts-prefix --data "$BANK" --codec-dir "$CODEC" \
    --init "$DECODER" --out "$WORK/tts-prefix" --speech-cache "$WORK/speech" --own-input-rate "$RATE" \
    --train-limit "${PREFIX_QUESTIONS:-120}" --steps "${PREFIX_STEPS:-300}" --batch 8 --lr 1e-3 --warmup-steps 20 \
    --checkpoint-every 25 --max-codec-tokens "${MAX_CODEC_TOKENS:-400}" --device "${DEVICE:-cpu}" --threads "${THREADS:-1}"
freeze-omni train tts-export --init "$WORK/tts-prefix" --codec-dir "$CODEC" --out "$OUT"
freeze-omni say --model-dir "$OUT" --text "Hello, I am your assistant. How can I help you today?" \
    --output "$WORK/say.wav"
freeze-omni eval tts --model-dir "$OUT" --data "$BANK" --limit "${EVAL_ANSWERS:-10}" \
    --speech-cache "$WORK/speech" ${EVAL_MAX_SPEECH_TOKENS:+--max-speech-tokens "$EVAL_MAX_SPEECH_TOKENS"} --json | tee "$WORK/eval_tts.json"

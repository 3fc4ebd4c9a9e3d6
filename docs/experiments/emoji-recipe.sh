#!/usr/bin/env bash
# The two-stage recipe that made latentdiff/weights/emoji.safetensors (docs/experiments.md, "The shipped model").
#
#   bash docs/experiments/emoji-recipe.sh data                 # render the emoji (needs fonts-noto-color-emoji)
#   bash docs/experiments/emoji-recipe.sh stage1 OUT           # on a GPU: VAE, encode, U-Net + decoder, merge
#   bash docs/experiments/emoji-recipe.sh stage2 INIT OUT      # 6,500 steps of batch 64 from stage 1's file
#   python -m latentdiff.evaluate --checkpoint OUT/emoji.safetensors --data data/emoji
#
# Run from the repository root. Stage 1 was time-boxed on one H200 (each run stopped by SIGTERM, which saves, after
# the wall time below), so its step counts depend on the machine; stage 2 is a fixed number of steps. The shipped
# file is stage 2 run on the 2-core CPU (68 minutes) from shared stage-1 weights; on a GPU the in-memory data path
# (data.in_memory) runs the same steps in a minute or two.
set -euo pipefail
py=${PYTHON:-python3}
train="$py -m latentdiff.train --config configs/emoji.yaml"
pixels=(--data.latents=false "--data.shards=data/emoji/emoji-{000000..000013}.tar" --train.train_text_encoder=false
        --train.init_vae=null --train.timestep_bias=0 --train.sample_every=0)

case "${1:-}" in
data)
  $py -m latentdiff.data emoji --out data/emoji
  ;;
stage1)
  out=${2:?usage: stage1 OUT}
  # VAE on pixels, 70 s (1,491 steps on the H200)
  timeout --foreground -s TERM 70 $train --train.stage=vae "${pixels[@]}" --data.batch_size=32 --data.num_workers=6 \
      --train.steps=6000 --train.lr=1.5e-3 --train.warmup_steps=200 --train.out_dir="$out/vae" || true
  vae=$(ls -d "$out"/vae/ckpt-* | sort | tail -1)/model.safetensors
  $py -m latentdiff.data encode-shards data/emoji --out data/emoji-latents --checkpoint "$vae"
  # U-Net + text encoder on the latents, beside the decoder alone on pixels (encoder frozen), 165 s each
  timeout --foreground -s TERM 165 $train --train.init_vae="$vae" --data.batch_size=256 --train.lr=2e-3 \
      --train.steps=8000 --train.warmup_steps=200 --train.sample_every=0 --train.out_dir="$out/unet" &
  timeout --foreground -s TERM 165 $train --train.stage=vae "${pixels[@]}" --data.batch_size=32 \
      --data.num_workers=4 --train.init="$vae" --train.vae_trainable=decoder --train.lr=1e-3 --train.warmup_steps=50 \
      --train.steps=12000 --train.out_dir="$out/dec" &
  wait || true
  $py -m latentdiff.checkpoint "$(ls -d "$out"/unet/ckpt-* | sort | tail -1)/model.safetensors" \
      "$out/emoji-stage1.safetensors" --vae "$(ls -d "$out"/dec/ckpt-* | sort | tail -1)/model.safetensors"
  ;;
stage2)
  init=${2:?usage: stage2 INIT OUT}
  out=${3:?usage: stage2 INIT OUT}
  # The latents of stage 1's VAE (skipped when data/emoji-latents already holds them).
  [ -f data/emoji-latents/emoji-000013.tar ] ||
      $py -m latentdiff.data encode-shards data/emoji --out data/emoji-latents --checkpoint "$init"
  $train --train.init="$init" --train.init_vae=null --data.batch_size=64 --train.lr=1e-3 --train.steps=6500 \
      --train.warmup_steps=100 --train.checkpoint_every=500 --train.keep_last=2 --train.sample_every=0 \
      --train.log_every=50 --train.out_dir="$out/run" --resume auto ${STAGE2_ARGS:-}
  $py -m latentdiff.checkpoint "$(ls -d "$out"/run/ckpt-* | sort | tail -1)/model.safetensors" "$out/emoji.safetensors"
  ;;
*)
  sed -n '2,13p' "$0"
  exit 2
  ;;
esac

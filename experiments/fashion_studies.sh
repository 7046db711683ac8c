#!/usr/bin/env bash
# The Fashion-MNIST studies of experiments/RESULTS.md, in the order they are run.
#
#   bash experiments/fashion_studies.sh [STEP ...]     # default: every step, in order
#
# Each step is one experiment script writing into experiments/results/fashion_<step>/.
# Finished runs are kept in that directory's ledger.json (committed with the results), so
# the script continues where it stopped, on this machine or another; trained models go to
# $STORE (default runs/fashion/store, not committed). Every run is evaluated the same way:
# clean accuracy on the 10,000 test images, AutoAttack standard at L-inf 0.05, L-inf 0.1
# and L2 1.0 on the first 1,000, the 19 corruptions at severities 1-5 and the
# CIFAR-10-P-style stability on all 10,000. Needs the Fashion-MNIST files
# (apt-get install dataset-fashion-mnist). About 6-13 minutes per run on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${STORE:-runs/fashion/store}
SEEDS=${SEEDS:-0,1,2,3,4}
CONFIG=experiments/configs/fashion_lenet.py
EVAL=(--corruptions none --autoattack_budgets linf_0.05,linf_0.1,l2_1.0
      --autoattack_examples 1000 --sections corruptions,stability)
AT_METHODS=vanilla,replay,pgd_at,fast_at,trades,anp_pgd_at,anp_fast_at,anp_trades,replay_pgd_at,replay_fast_at,replay_trades

run() {  # run STEP SCRIPT ARGS...
  local step=$1 script=$2
  shift 2
  echo "== $step: python -m experiments.$script $*" >&2
  python -m "experiments.$script" --out "experiments/results/fashion_$step" --store "$STORE" \
    --config "$CONFIG" --seeds "$SEEDS" "${EVAL[@]}" "$@"
}

scaled() {  # scaled STEP PEAK SHOULDER POINTS GROUPS: noise relative to each activation
  run "$1" layers --points "$4" --groups "$5" --config.anp.scale_by_activation_norm=true \
    --config.anp.schedule=piecewise "--config.anp.boundaries=(1.3333,2.0,2.6667,3.3333)" \
    "--config.anp.eps_values=(0.0,$3,$2,$3,0.0)" \
    "--config.anp.alpha_values=(0.0,0.7,1.0,0.7,0.0)" "--config.anp.k_values=(1,3,3,3,1)"
}

step() {
  case $1 in
    # Claim 1: ANP against vanilla and the replay control (same updates, no noise).
    methods) run methods methods --methods vanilla,replay,anp ;;
    # Claim 1 at equal wall-clock time: vanilla for 10 epochs trains at least as long as
    # ANP's 4 (about 60 s against 56 s on the idle 2 cores).
    time) run time methods --methods vanilla --epochs 10 ;;
    # Is ANP only input noise? The input point alone, every point but the input, all.
    layers) run layers layers --points input --groups hidden,all ;;
    # ... and single-step L2 adversarial training on the input at ANP's peak budget.
    l2at) run l2at methods --methods fast_at --config.adv.norm=l2 --config.adv.epsilon=1.0 ;;
    # Claim 3: ANP added to adversarial training (L-inf 0.1, the usual Fashion budget), and
    # each combination's control: the same adversarial training with ANP's updates per
    # mini-batch and no noise.
    at) run at methods --methods "$AT_METHODS" ;;
    # ... and the combinations at a smaller noise: the official shape with peak eps 0.3
    # (0.09 / 0.3 / 0.09) instead of ANP alone's 1.0; the controls are the at step's runs.
    at_eps) run at_eps0.3 methods --methods "$AT_METHODS" --config.anp.epsilon=0.3 ;;
    # Claim 2: shallow against deep, each point alone.
    points) run points layers ;;
    # eps and k one at a time (constant schedule), and the schedules side by side.
    hparams) run hparams hparams --eps 0.3,1,2 --alpha 0.5 --k 1,2,3 ;;
    schedules) run schedules schedules ;;
    # Noise scaled to each point's activations: does the hidden-layer verdict change?
    # The official schedule's shape (stretched to 4 epochs, as anp.schedule="official")
    # with eps relative to the activation's norm: 0.082 at the peak is eps 1.0 at the
    # input for the mean Fashion-MNIST training image (L2 norm 12.15).
    scaled) scaled scaled 0.082 0.025 input hidden,all ;;
    # The hidden points at smaller relative budgets: their activations' norms are 110
    # (conv1), 98 (conv2), 19 (fc1) and 14 (fc2) in a trained plain LeNet, so 0.082 puts
    # 8-9 times the absolute recipe's noise on the convolutions.
    scaled_hidden) scaled scaled_0.03 0.03 0.009 none hidden
                   scaled scaled_0.01 0.01 0.003 none hidden ;;
    # Claim 2 on a deeper network: VGG-8-BN's 8 points (the input and the 7 convolutions
    # before BatchNorm), each alone, the hidden points, the shallow and deep halves, all.
    vgg_points) CONFIG=experiments/configs/fashion_vgg.py run vgg_points layers ;;
    *) echo "unknown step $1; steps: methods time layers l2at at at_eps points hparams schedules scaled scaled_hidden vgg_points" >&2
       return 2 ;;
  esac
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(methods time layers l2at at at_eps points hparams schedules scaled scaled_hidden vgg_points)
for s in "${steps[@]}"; do step "$s"; done

#!/usr/bin/env bash
# Mutation check of the trainer's filter/weight path (issue 18 item 1): apply each mutation to a scratch copy,
# run the train tests that cover the path, report whether some test fails (each line should say "N failed").
# Usage: bash scripts/mutation_check.sh   (about 4 minutes on 2 cores)
set -u
tree=$(mktemp -d)/tree
trap 'rm -rf "$(dirname "$tree")"' EXIT
src=$(cd "$(dirname "$0")/.." && pwd)
for m in weights_dropped keep_ignored weights_not_normalized stop_ignored; do
  rm -rf $tree; mkdir -p $tree; cp -r $src/ippo $src/tests $tree/; cp $src/pyproject.toml $tree/
  case $m in
    weights_dropped) a='loss = (weights[mb] * per_episode).mean()'; b='loss = per_episode.mean()';;
    keep_ignored) a='kept_idx = torch.nonzero(keep).squeeze(1)'
                  b='kept_idx = torch.arange(len(keep), device=keep.device)';;
    weights_not_normalized) a='scores / scores[keep].mean()'; b='scores';;
    stop_ignored) a='    return record, stop'; b='    return record, False';;
  esac
  f=$(cd $tree && grep -rlF -- "$a" ippo/train)
  python3 - "$f" "$a" "$b" "$tree" <<'PY'
import sys
p, a, b, tree = sys.argv[1:5]
p = tree + '/' + p
s = open(p).read()
assert s.count(a) == 1, (p, a)
open(p, 'w').write(s.replace(a, b))
PY
  tests="tests/train/test_train_trainer.py tests/train/test_train_ppo_math.py tests/train/test_train_stop_probe.py"
  (cd $tree && PYTHONPATH=$tree timeout 900 $src/.venv/bin/python -m pytest -q -p no:cacheprovider $tests \
     -k "ippo or update or stop or filter" 2>&1 | tail -n 1 | sed "s/^/$m: /")
done

#!/usr/bin/env bash
# Nightly top-up of a Magpie dataset to a target count, logging to a file.
#
# crontab -e:
#   15 2 * * *  /path/to/magpie/examples/nightly-topup.sh
#
# Each run reads data.jsonl, counts its valid records and generates only the
# missing ones (same seed, next indexes), so reruns converge on TARGET exactly.
# A torn last line left by a crash is moved to data.jsonl.torn first.
#
# Exit codes of `magpie generate` (see README):
#   0 done (or nothing to do)      1 failure during the run
#   2 bad usage or input           3 Ollama unreachable or model not pulled
#   4 another run holds the lock   130/143 interrupted / terminated
set -u

DATA_DIR="${DATA_DIR:-$HOME/magpie-data}"
TARGET="${TARGET:-10000}"
MODEL="${MODEL:-llama3.1:8b}"
HOST="${OLLAMA_HOST:-http://127.0.0.1:11434}"
MAGPIE="${MAGPIE:-magpie}"        # e.g. /path/to/magpie/.venv/bin/magpie in cron

mkdir -p "$DATA_DIR"
LOG="$DATA_DIR/magpie.log"

{
  echo "=== $(date -Is) top-up to $TARGET with $MODEL at $HOST"
  "$MAGPIE" generate \
      --num "$TARGET" \
      --output "$DATA_DIR/data.jsonl" \
      --backend ollama --model "$MODEL" --host "$HOST" \
      --quiet
  status=$?
  case $status in
    0)   echo "ok: $(wc -l < "$DATA_DIR/data.jsonl") records" ;;
    3)   echo "Ollama down or model missing; the next run resumes" ;;
    130|143) echo "interrupted; the next run resumes" ;;
    *)   echo "magpie failed with exit code $status" ;;
  esac
  exit $status
} >>"$LOG" 2>&1

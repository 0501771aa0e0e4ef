#!/bin/sh
# Recreate the throwaway torch benchmark venv (~5.6 GB, ~1-2 min on PyPI).
set -e
mkdir -p /tmp/torchbench && cd /tmp/torchbench
python3 -m venv venv
venv/bin/pip install -q --upgrade pip
venv/bin/pip install 'torch==2.15.*' 'transformers==5.24.*' gguf accelerate

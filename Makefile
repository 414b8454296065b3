# Two entry points, both self-installing: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Real sample videos for the video tests (opencv-doc's Megamind.avi, vtest.avi, ...): fetched from Debian's
# opencv-doc package without installing it; offline or without apt the step does nothing and those tests skip.
OPENCV_DATA := .cache/opencv-doc

.PHONY: demo test venv bench clean opencv-data

# PyTorch 2.14.1 for x86_64 Linux is a CUDA build: the venv takes about 6.5 GB. pip keeps no cache copy
# (PIP_NO_CACHE_DIR), and a short disk is named before the install rather than failing halfway through it.
VENV_NEEDS_GB := 7
export PIP_NO_CACHE_DIR := 1

$(STAMP): pyproject.toml
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	  if [ "$$free_kb" -lt $$(( $(VENV_NEEDS_GB) * 1024 * 1024 )) ]; then \
	    echo "warning: $$(( free_kb / 1024 / 1024 )) GB free in $$(pwd); the .venv (PyTorch's CUDA build) needs about $(VENV_NEEDS_GB) GB" >&2; fi
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[all,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/ernie-vl demo --out runs/demo

test: $(STAMP) opencv-data
	$(BIN)/python -m pytest -q

opencv-data:
	-@test -f $(OPENCV_DATA)/Megamind.avi || ( rm -rf $(OPENCV_DATA)/deb && mkdir -p $(OPENCV_DATA)/deb \
	  && cd $(OPENCV_DATA)/deb && ( apt-get download opencv-doc || ( apt-get update -qq && apt-get download opencv-doc ) ) >/dev/null 2>&1 \
	  && dpkg-deb --fsys-tarfile opencv-doc_*.deb | tar -x --strip-components=7 -C .. --wildcards \
	     './usr/share/doc/opencv-doc/examples/data/*.avi' ); rm -rf $(OPENCV_DATA)/deb; \
	  test -f $(OPENCV_DATA)/Megamind.avi || echo "opencv-doc sample videos not fetched (offline?): their tests skip"

clean:
	rm -rf $(VENV) runs .pytest_cache

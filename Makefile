# Two entry points, both self-installing: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Real sample videos for the video tests (opencv-doc's Megamind.avi, vtest.avi, ...): fetched from Debian's
# opencv-doc package without installing it; offline or without apt the step does nothing and those tests skip.
OPENCV_DATA := .cache/opencv-doc

.PHONY: demo test venv bench clean opencv-data

$(STAMP): pyproject.toml
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

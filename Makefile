# kvatlas: `make site` builds and serves the atlas, `make test` runs the tests. Both install what they need.
VENV := .venv/bin
export NO_MKDOCS_2_WARNING := 1
export DISABLE_MKDOCS_2_WARNING := true
export PYTHONUNBUFFERED := 1
PORT ?= 8000

.PHONY: install test test-fast notebooks notebooks-check docs docs-quick site serve site-check browser-deps \
        contract clean

install:
	@bash scripts/install.sh

test: install           ## all tests, the slow ones on the embedded model included
	$(VENV)/python -m pytest -q

test-fast: install      ## tests without the embedded model
	$(VENV)/python -m pytest -q -m "not slow"

notebooks: install      ## execute the notebooks whose source, package code or results changed (kept in notebooks/executed/)
	$(VENV)/python scripts/execute_notebooks.py

notebooks-check: install  ## fail if a checked-in executed notebook is stale, missing or unclean (CI)
	$(VENV)/python scripts/execute_notebooks.py --check

docs: notebooks         ## strict build from the executed notebooks (executes only the stale ones first)
	$(VENV)/kvatlas validate
	$(VENV)/kvatlas schema --check
	$(VENV)/mkdocs build --strict
	$(VENV)/python scripts/check_site.py site

docs-quick: install     ## strict layout build: stale notebooks shown without outputs, nothing executed
	$(VENV)/kvatlas validate
	$(VENV)/kvatlas schema --check
	KVATLAS_EXECUTE_NOTEBOOKS=false $(VENV)/mkdocs build --strict
	$(VENV)/python scripts/check_site.py site

site: docs serve        ## build, then serve at http://127.0.0.1:8000

serve:
	@echo "serving the atlas at http://127.0.0.1:$(PORT)/ (Ctrl-C to stop)"
	$(VENV)/python -m http.server $(PORT) --bind 127.0.0.1 --directory site

browser-deps:           ## Debian's chromium for the browser test (idempotent)
	@bash scripts/install_browser.sh

site-check: browser-deps  ## the browser test against the built site; screenshots in site-screenshots/
	KVATLAS_SITE=site KVATLAS_SCREENSHOTS=site-screenshots $(VENV)/python -m pytest -q -p no:cacheprovider \
	    tests/test_site_browser.py

contract: install
	PATH=$(CURDIR)/.venv/bin:$$PATH ../shared/tools/check-contract

clean:
	rm -rf site .cache site-screenshots

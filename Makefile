# kvatlas: `make site` builds and serves the atlas, `make test` runs the tests. Both install what they need.
VENV := .venv/bin
export NO_MKDOCS_2_WARNING := 1
export DISABLE_MKDOCS_2_WARNING := true
export PYTHONUNBUFFERED := 1

.PHONY: install test test-fast docs docs-quick site serve contract clean

install:
	@bash scripts/install.sh

test: install           ## all tests, the slow ones on the embedded model included
	$(VENV)/python -m pytest -q

test-fast: install      ## tests without the embedded model
	$(VENV)/python -m pytest -q -m "not slow"

docs: install           ## strict build: executes every notebook on the embedded model
	$(VENV)/kvatlas validate
	$(VENV)/kvatlas schema --check
	rm -rf .cache/mkdocs-jupyter
	$(VENV)/mkdocs build --strict
	$(VENV)/python scripts/check_site.py site

docs-quick: install     ## strict build without executing the notebooks (CI: keeps it under 30 minutes)
	$(VENV)/kvatlas validate
	$(VENV)/kvatlas schema --check
	KVATLAS_EXECUTE_NOTEBOOKS=false $(VENV)/mkdocs build --strict
	$(VENV)/python scripts/check_site.py site

site: docs serve        ## build, then serve at http://127.0.0.1:8000

serve:
	@echo "serving the atlas at http://127.0.0.1:8000 (Ctrl-C to stop)"
	$(VENV)/python -m http.server 8000 --bind 127.0.0.1 --directory site

contract: install
	PATH=$(CURDIR)/.venv/bin:$$PATH ../shared/tools/check-contract

clean:
	rm -rf site .cache

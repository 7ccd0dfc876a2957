# Convenience targets; ./dev.sh does the work (it needs nothing but bash).
.PHONY: run test venv bench
run:
	./dev.sh run
test:
	./dev.sh test
venv:
	./dev.sh venv
bench:
	./dev.sh venv && .venv/bin/python bench/run_all.py

include mk/install.mk
include mk/deb.mk

# Convenience targets; ./dev.sh does the work (it needs nothing but bash).
.PHONY: run test venv bench bench-fleet
run:
	./dev.sh run
test:
	./dev.sh test
venv:
	./dev.sh venv
bench:
	./dev.sh venv && .venv/bin/python bench/run_all.py
# 50 virtwatch daemons (test-driver hosts, 50 guests each) scraped by Prometheus, stored in
# VictoriaMetrics, alerting through Alertmanager: prints the figures of docs/fleet.md (~8 min,
# CPU heavy). Needs prometheus, prometheus-alertmanager, victoria-metrics (.ci/apt-packages.txt).
bench-fleet:
	./dev.sh venv && .venv/bin/python bench/fleet.py

include mk/install.mk
include mk/deb.mk

# Convenience targets; ./dev.sh does the work (it needs nothing but bash).
.PHONY: run test venv bench bench-peer bench-fleet
run:
	./dev.sh run
test:
	./dev.sh test
venv:
	./dev.sh venv
bench:
	./dev.sh venv && .venv/bin/python bench/run_all.py
# virtwatch side by side with Debian's prometheus-libvirt-exporter and collectd's virt plugin on
# real guests (root; libprotobuf-c1 + libmicrohttpd12: collectd-core only recommends what its
# write_prometheus plugin links against)
BENCH_PEER_PACKAGES = prometheus-libvirt-exporter collectd-core libprotobuf-c1 libmicrohttpd12
bench-peer:
	./dev.sh venv
	dpkg -s $(BENCH_PEER_PACKAGES) >/dev/null 2>&1 || apt-get install -y $(BENCH_PEER_PACKAGES)
	bash .ci/start-libvirtd.sh
	.venv/bin/python bench/peer.py $(ARGS)
# 50 virtwatch daemons (test-driver hosts, 50 guests each) scraped by Prometheus, stored in
# VictoriaMetrics, alerting through Alertmanager: prints the figures of docs/fleet.md (~8 min,
# CPU heavy). Needs prometheus, prometheus-alertmanager, victoria-metrics (.ci/apt-packages.txt).
bench-fleet:
	./dev.sh venv && .venv/bin/python bench/fleet.py

include mk/install.mk
include mk/deb.mk

"""The tokenslice Kubernetes operator (``tokenslice operator``).

Modules: ``config`` (settings + naming conventions), ``children`` (the picker objects of a pool),
``reconcile`` (level-triggered convergence of a pool, its policy and their status), ``inject`` +
``webhook`` (sidecar injection at pod admission), ``kube`` (a small asyncio API client), ``app``
(kopf wiring, peering), ``crdgen`` (CRD + chart files generated from the shared models), ``cli``.
"""

"""gateway_ext: the Envoy ext_proc endpoint picker that schedules every chunk.

Layers, each behind a narrow interface (as in the GIE endpoint picker):

* ``extproc``      -- the gRPC ext_proc servicer: Envoy messages in, routing decisions out;
* ``flowcontrol``  -- queues per (class, tenant), priority with aging, weighted fair share, limits;
* ``scheduling``   -- filters -> scorers -> picker that choose an endpoint for one chunk;
* ``datastore``    -- the pool's endpoints (static or Kubernetes) and their live load;
* ``dispatcher``   -- ties them together: a chunk waits inside its ext_proc call until granted a slot.
"""

from tokenslice_picker.server import Gateway, GatewaySettings, start_gateway

__all__ = ["Gateway", "GatewaySettings", "start_gateway"]

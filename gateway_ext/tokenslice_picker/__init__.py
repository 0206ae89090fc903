"""tokenslice_picker: the Envoy ext_proc endpoint picker that schedules every chunk.

Layers, each behind a narrow interface (as in the GIE endpoint picker):

* ``extproc``      -- the gRPC ext_proc servicer: Envoy messages in, routing decisions out;
* ``admission``    -- a client's own request: tenant limits, queue bound, its driver;
* ``flowcontrol``  -- queues per (class, tenant), priority with aging, fair-share accounting, limits;
* ``scheduling``   -- filters -> scorers -> picker that place one chunk; the migration rule; the victim slot;
* ``datastore``    -- the pool's endpoints (static or Kubernetes) and their live load;
* ``dispatcher``   -- sequences them: a chunk waits inside its ext_proc call until granted a slot.
"""

from tokenslice_picker.server import Picker, PickerSettings, start_picker

__all__ = ["Picker", "PickerSettings", "start_picker"]

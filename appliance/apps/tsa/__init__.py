"""RFC 3161 timestamping (issue 12): the codec (:mod:`.rfc3161`), the authority's core
(:mod:`.authority`), its HTTP route (:mod:`.http`)."""

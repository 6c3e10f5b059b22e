"""QOM: the user-creatable object types and the /objects tree qom-* commands walk."""

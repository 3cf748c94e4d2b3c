"""Pure planning: Recipe x Machine -> Plan. Nothing in this package touches the machine."""

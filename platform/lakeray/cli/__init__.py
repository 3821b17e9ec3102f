"""The `lakeray` command line: thin click commands over the modules; heavy imports happen per command."""

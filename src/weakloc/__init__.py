from weakloc._version import __version__

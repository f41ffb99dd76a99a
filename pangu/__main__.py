from pangu.cli import entry

entry()

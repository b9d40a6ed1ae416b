from stadapter.cli.main import app

app(prog_name="stadapter")

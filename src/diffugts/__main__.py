from diffugts.cli import run

run()

from rmlab.bench.cli import main

main()

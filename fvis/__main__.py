from fvis.cli import main

main()

from magpie.cli import main

main()

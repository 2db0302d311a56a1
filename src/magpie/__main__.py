from magpie.cli.app import main

main()

from fedmole.cli import main
import sys
sys.exit(main())
